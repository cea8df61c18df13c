"""Losses: L1, MS-SSIM (on ``adaptive_tokenizer.metrics.ssim_maps``, the SSIM of the evaluation; no pretrained
networks), label-smoothed cross-entropy; for sharp, faithful reconstructions (stage 3): a patch discriminator
trained from scratch with hinge losses and taming's adaptive weight, a local gradient-energy term and a colour
term built on ``adaptive_tokenizer.metrics``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive_tokenizer.metrics import chroma_map, gradient_magnitude_map, ssim_maps

# Wang et al. 2003 scale weights; fewer scales use the first ones, renormalised.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim(x: Tensor, y: Tensor, scales: int | None = None, window_size: int = 7, sigma: float = 1.5,
            data_range: float = 1.0) -> Tensor:
    """Multi-scale SSIM per image, ``[N]``, computed in float32. ``scales``: as many as fit (<= 5) when None.

    Contrast/structure terms are clamped at 0 before the weighted geometric mean (keeps gradients finite).
    """
    x, y = x.float(), y.float()
    max_scales = 1
    while max_scales < 5 and min(x.shape[-2:]) // 2**max_scales >= window_size:
        max_scales += 1
    scales = min(scales or max_scales, max_scales)
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], device=x.device)
    weights = weights / weights.sum()
    values = []
    for scale in range(scales):
        ssim, cs = ssim_maps(x, y, window_size=window_size, sigma=sigma, data_range=data_range)
        if scale == scales - 1:
            values.append(ssim.flatten(1).mean(1).clamp_min(1e-6))
        else:
            values.append(cs.flatten(1).mean(1).clamp_min(1e-6))
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    stacked = torch.stack(values, dim=1)  # [N, scales]
    return torch.exp((stacked.log() * weights).sum(1))


def reconstruction_loss(recon: Tensor, target: Tensor, ssim_weight: float) -> tuple[Tensor, dict[str, float]]:
    """``L1 + ssim_weight * (1 - MS-SSIM)``, in float32. Returns the loss and its parts for logging."""
    recon, target = recon.float(), target.float()
    l1 = (recon - target).abs().mean()
    loss = l1
    parts = {"l1": l1.item()}
    if ssim_weight > 0:
        msssim = ms_ssim(recon, target).mean()
        loss = loss + ssim_weight * (1 - msssim)
        parts["msssim"] = msssim.item()
    return loss, parts


def smoothed_cross_entropy(logits: Tensor, targets: Tensor, smoothing: float = 0.1) -> Tensor:
    """Cross-entropy with label smoothing; ``logits [..., K]``, ``targets [...]`` int64; float32 math."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           label_smoothing=smoothing)


class PatchDiscriminator(nn.Module):
    """taming's ``NLayerDiscriminator`` (pix2pix PatchGAN) with GroupNorm instead of BatchNorm (batches of 8 mix
    real and reconstructed images): 4x4 convolutions, ``layers`` of them with stride 2, then two with stride 1;
    ``[N, 3, R, R]`` in [0, 1] -> ``[N, 1, R / 2**layers - 2, ...]`` real/fake logits, one per overlapping patch
    (70x70 pixels at 3 layers). Initialised as taming: N(0, 0.02) convolutions, N(1, 0.02) norm scales."""

    def __init__(self, channels: int = 32, layers: int = 3, groups: int = 8):
        super().__init__()
        modules: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for index in range(1, layers + 1):
            out = channels * min(2**index, 8)
            stride = 2 if index < layers else 1
            modules += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.GroupNorm(groups, out), nn.LeakyReLU(0.2)]
            width = out
        modules.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*modules)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.02)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.GroupNorm):
                    module.weight.copy_(1 + torch.randn(module.weight.shape, generator=gen) * 0.02)
                    module.bias.zero_()

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images * 2 - 1)


def hinge_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """``0.5 (mean relu(1 - real) + mean relu(1 + fake))`` (taming's ``hinge_d_loss``), float32."""
    return 0.5 * (F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean())


def generator_loss(fake_logits: Tensor) -> Tensor:
    """The generator's hinge loss, ``-mean(fake logits)``."""
    return -fake_logits.float().mean()


def adaptive_weight(reconstruction_loss: Tensor, adversarial_loss: Tensor, last_layer: Tensor,
                    max_weight: float = 1e4) -> Tensor:
    """taming's ``calculate_adaptive_weight``: ``|grad rec| / (|grad adv| + 1e-4)`` at ``last_layer`` (the
    decoder's output convolution), clamped to ``[0, max_weight]``, detached: the adversarial gradient reaching
    the decoder's output is then a fixed fraction (the discriminator weight) of the reconstruction gradient."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adversarial_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0, max_weight).detach()


def gradient_energy_loss(reconstructions: Tensor, targets: Tensor, patch: int = 8) -> Tensor:
    """Mean |local mean gradient magnitude of the reconstruction - of the target| over ``patch`` x ``patch``
    windows of the grey images: asks for as much texture as the input has in each window without asking for it
    at the same pixels (which L1 on gradients would, and so would average the unknowable detail away)."""
    rec = F.avg_pool2d(gradient_magnitude_map(reconstructions, eps=1e-6), patch, ceil_mode=True)
    ref = F.avg_pool2d(gradient_magnitude_map(targets, eps=1e-6), patch, ceil_mode=True)
    return (rec - ref).abs().mean()


def colour_loss(reconstructions: Tensor, targets: Tensor) -> Tensor:
    """Colour fidelity: mean |chroma map difference| (the colour part of each pixel: a greyscale target asks
    for zero chroma everywhere) + mean |per-image channel mean difference| (casts, brightness shifts)."""
    rec, ref = reconstructions.float(), targets.float()
    offset = (rec.mean(dim=(2, 3)) - ref.mean(dim=(2, 3))).abs().mean()
    return (chroma_map(rec) - chroma_map(ref)).abs().mean() + offset
