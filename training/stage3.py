"""Stage 3 (``python -m training.distill --pixel-weight > 0``): the pixel loss of a reconstruction, the base
decoder's own term (``--train-base-decoder``) and the patch discriminator (``--disc-weight > 0``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import Tensor

from adaptive_tokenizer.io_utils import write_atomic
from adaptive_tokenizer.model import ALITModel

from .common import autocast
from .losses import (PatchDiscriminator, adaptive_weight, colour_loss, generator_loss, gradient_energy_loss,
                     hinge_discriminator_loss, reconstruction_loss)

DISCRIMINATOR = "discriminator.safetensors"


def pixel_terms(recon: Tensor, pixels: Tensor, args: argparse.Namespace,
                parts: dict[str, float]) -> tuple[Tensor, dict[str, float]]:
    """Stage 3's pixel loss of one reconstruction: ``L1 + ssim_weight (1 - MS-SSIM) + grad_weight *
    gradient_energy_loss + colour_weight * colour_loss`` (the last two when their weights are > 0; logged into
    ``parts``)."""
    loss, pix = reconstruction_loss(recon, pixels, args.ssim_weight)
    if args.grad_weight > 0:
        energy = gradient_energy_loss(recon, pixels)
        loss = loss + args.grad_weight * energy
        parts["grad"] = energy.item()
    if args.colour_weight > 0:
        colour = colour_loss(recon, pixels)
        loss = loss + args.colour_weight * colour
        parts["colour"] = colour.item()
    return loss, pix


class Adversary:
    """Stage 3's discriminator side (``--disc-weight > 0``): a :class:`PatchDiscriminator` trained from scratch
    with hinge losses on real crops against the step's reconstructions (its own AdamW, betas (0.5, 0.9) as
    taming), and the generator's term ``disc_weight * adaptive_weight * -mean D(reconstruction)`` once
    ``generator_on`` (from ``--disc-start``; the discriminator learns from the first step), times ``ramp`` (0 -> 1
    linearly over ``--disc-ramp`` steps from ``--disc-start``; 1 without a ramp)."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.weight = args.disc_weight
        self.precision = args.precision
        self.device = device
        self.discriminator = PatchDiscriminator(args.disc_channels, args.disc_layers).to(device)
        self.optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=args.disc_lr, betas=(0.5, 0.9),
                                           weight_decay=0.0)
        self.start, self.ramp_steps = args.disc_start, args.disc_ramp
        self.generator_on = False
        self.ramp = 1.0
        self.fakes: list[Tensor] = []

    def follow_schedule(self, step: int) -> None:
        """Before global ``step``: the generator term on from ``--disc-start``, ramped over ``--disc-ramp`` steps."""
        self.generator_on = step >= self.start
        if self.ramp_steps > 0:
            self.ramp = min(1.0, (step - self.start + 1) / self.ramp_steps)

    def generator_term(self, images: Tensor) -> Tensor:
        """``-mean D(images)``, differentiable into ``images`` (the discriminator's own weights get no gradient)."""
        self.discriminator.requires_grad_(False)
        with autocast(self.device, self.precision):
            logits = self.discriminator(images)
        self.discriminator.requires_grad_(True)
        return generator_loss(logits)

    def train_step(self, real: Tensor) -> dict[str, float]:
        """One discriminator step on ``real`` against the reconstructions collected by the last ``distill_step``."""
        fake = torch.cat(self.fakes)
        self.fakes = []
        with autocast(self.device, self.precision):
            real_logits = self.discriminator(real)
            fake_logits = self.discriminator(fake)
        loss = hinge_discriminator_loss(real_logits, fake_logits)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"d_loss": loss.item(), "d_real": real_logits.float().mean().item(),
                "d_fake": fake_logits.float().mean().item()}

    def state_dict(self) -> dict:
        return {"discriminator": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])


def base_decoder_terms(loss: Tensor, model: ALITModel, pixels: Tensor, target_vectors: Tensor,
                       args: argparse.Namespace, device: torch.device, parts: dict[str, float], pixel_total: Tensor,
                       adversarial_total: Tensor, adversary: Adversary | None) -> Tensor:
    """``--train-base-decoder``: ``loss`` plus the pixel loss of the base's own codes (``target_vectors``) through
    the fine-tuned base decoder, so that it still decodes them (the base tokenizer's reconstruction stays a true
    ceiling), and, when the ``adversary``'s generator term is on, that term over all the step's reconstructions at
    taming's adaptive weight (measured at the base decoder's output layer). ``pixel_total`` /
    ``adversarial_total``: the sampled iterations' pixel and generator terms, already divided by their weights'
    sum."""
    with autocast(device, args.precision):
        base_recon = model.base.decode_features(target_vectors)
    base_pixel_loss, base_pix = pixel_terms(base_recon, pixels, args, {})
    loss = loss + args.pixel_weight * base_pixel_loss
    parts["base_l1"] = base_pix["l1"]
    if adversary is None:
        return loss
    adversary.fakes.append(base_recon.detach().float())
    if not adversary.generator_on:
        return loss
    pixel_total = pixel_total + args.pixel_weight * base_pixel_loss
    adversarial_total = adversarial_total + adversary.generator_term(base_recon)
    last_layer = model.base.decoder.conv_out.weight
    d_weight = adaptive_weight(pixel_total, adversarial_total, last_layer) * adversary.weight * adversary.ramp
    parts.update(g_loss=adversarial_total.item(), d_weight=d_weight.item())
    return loss + d_weight * adversarial_total


def save_discriminator(adversary: Adversary, out: Path) -> None:
    """``OUT/discriminator.safetensors`` (fp16): to continue the adversarial training elsewhere
    (``--init-discriminator``)."""
    weights = {key: value.detach().half().contiguous().cpu()
               for key, value in adversary.discriminator.state_dict().items()}
    write_atomic(out / DISCRIMINATOR, save_safetensors(weights))


def load_discriminator(adversary: Adversary, path: str | Path) -> None:
    """``--init-discriminator``: a run's :func:`save_discriminator` file."""
    adversary.discriminator.load_state_dict({key: value.float() for key, value in load_file(path).items()})
