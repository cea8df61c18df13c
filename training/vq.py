"""Stage 1: the base VQ autoencoder (``adaptive_tokenizer.base_tokenizer.VQGAN``).

    python -m training.vq --data ../shared/corpus/photos --out ../runs/vq [--max-minutes 55 --threads 1]

Conv encoder/decoder (8x downsampling: 128 px -> 16x16 grid), 1024-entry codebook trained as an EMA k-means
codebook with dead-code restarts (inference uses plain squared-L2 nearest neighbour on the stored, unnormalised
codebook, which is exactly what the EMA codebook is trained for), commitment loss on the encoder, loss
``L1 + ssim_weight * (1 - MS-SSIM)`` on pixels. No pretrained networks, no GAN.

Trains on full ``--resolution`` crops by default. ``--size`` < resolution trains on smaller crops taken at the
inference pixel scale (then the last ``--full-size-frac`` of training on full crops, batch scaled by pixel
count); measured here it does not pay: 64 px crops give ~3.6x the images/s, i.e. the same pixels/s, and
GroupNorm's per-image statistics then differ from inference's (val L1 0.119 at 128 px vs 0.089 on 64 px tiles
of the same images after 1400 steps). Validation: mean L1 of the clamped reconstruction of the
held-out files under the library's evaluation transform (short side -> 128, centre crop).

Output (``--out``): ``checkpoint.pt`` (resumable: model, optimizer, EMA codebook state, data/RNG state),
``export/`` (``base_config.json`` + ``base.safetensors``, fp32: what ``training.distill --base`` reads),
``provenance.json``, ``split.json``, ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import Tensor

from adaptive_tokenizer.base_tokenizer import VQGAN
from adaptive_tokenizer.codebook import nearest_code
from adaptive_tokenizer.config import VQGANConfig
from adaptive_tokenizer.io_utils import write_atomic
from adaptive_tokenizer.model import base_reconstruction_error
from adaptive_tokenizer.presets import DEFAULT_BASE
from adaptive_tokenizer.serialization import load_model_files

from . import loop
from .common import add_common_args, atomic_write_text, autocast, make_scaler, optimizer_step
from .loop import IncompatibleRun, run_main
from .losses import reconstruction_loss

BASE_CONFIG = "base_config.json"
BASE_WEIGHTS = "base.safetensors"


class EMACodebook:
    """EMA k-means codebook state for ``VQGAN.codebook`` (kept outside the module; the module holds the result).

    ``count``/``total``: EMA of per-step assignment counts and vector sums; the codebook is ``total / count``
    (Laplace-smoothed). Codes whose EMA count falls below ``dead_threshold`` are restarted on random encoder
    outputs of the current batch.
    """

    def __init__(self, size: int, dim: int, decay: float, dead_threshold: float, device: torch.device):
        self.decay, self.dead_threshold, self.eps = decay, dead_threshold, 1e-5
        self.count = torch.zeros(size, device=device)
        self.total = torch.zeros(size, dim, device=device)
        self.initialised = False
        self.restarts = 0

    def state_dict(self) -> dict:
        return {"count": self.count, "total": self.total, "initialised": self.initialised, "restarts": self.restarts}

    def load_state_dict(self, state: dict) -> None:
        self.count.copy_(state["count"])
        self.total.copy_(state["total"])
        self.initialised, self.restarts = state["initialised"], state["restarts"]

    @torch.no_grad()
    def init_from(self, flat: Tensor, codebook: Tensor) -> None:
        picks = flat[torch.randint(0, flat.shape[0], (codebook.shape[0],), device=flat.device)]
        codebook.copy_(picks + 1e-3 * torch.randn_like(picks))
        self.count.fill_(2 * self.dead_threshold)  # unused initial codes get restarted after ~70 steps
        self.total.copy_(codebook * self.count[:, None])
        self.initialised = True

    @torch.no_grad()
    def update(self, flat: Tensor, ids: Tensor, codebook: Tensor) -> None:
        size = codebook.shape[0]
        counts = torch.bincount(ids, minlength=size).float()
        sums = torch.zeros_like(self.total).index_add_(0, ids, flat)
        self.count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.total.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.count.sum()
        smoothed = (self.count + self.eps) / (n + size * self.eps) * n
        codebook.copy_(self.total / smoothed[:, None])

    @torch.no_grad()
    def restart_dead(self, flat: Tensor, codebook: Tensor) -> int:
        dead = (self.count < self.dead_threshold).nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        picks = flat[torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)]
        picks = picks + 1e-3 * picks.std() * torch.randn_like(picks)
        codebook[dead] = picks
        self.total[dead] = picks * self.dead_threshold * 2
        self.count[dead] = self.dead_threshold * 2
        self.restarts += dead.numel()
        return dead.numel()


def vq_step(model: VQGAN, ema: EMACodebook, pixels: Tensor, args: argparse.Namespace, device: torch.device,
            train: bool = True) -> tuple[Tensor, dict[str, float], Tensor, Tensor]:
    """Forward + losses. Returns (loss, logged parts, flat encoder outputs, their code ids)."""
    with autocast(device, args.precision):
        z = model.encoder(pixels)
    z = z.float()
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    codebook = model.codebook.detach().float()
    if train and not ema.initialised:
        ema.init_from(flat.detach(), model.codebook.data)
        codebook = model.codebook.detach().float()
    ids = nearest_code(flat.detach(), codebook)
    quantized = codebook[ids].view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
    commit = F.mse_loss(z, quantized)
    z_q = z + (quantized - z).detach()
    with autocast(device, args.precision):
        recon = model.decoder(z_q)
    rec_loss, parts = reconstruction_loss(recon, pixels, args.ssim_weight)
    loss = rec_loss + args.commit_weight * commit
    usage = torch.bincount(ids, minlength=codebook.shape[0]).float()
    probs = usage / usage.sum()
    perplexity = torch.exp(-(probs * (probs + 1e-10).log()).sum())
    parts.update(loss=loss.item(), commit=commit.item(), ppl=perplexity.item())
    return loss, parts, flat.detach(), ids


@torch.no_grad()
def evaluate(model: VQGAN, val: Tensor, batch_size: int = 16) -> dict[str, float]:
    """Mean L1 (clamped reconstruction, fp32, the library's own code path) and code usage on held-out images."""
    was_training = model.training
    model.eval()
    errors, used = [], torch.zeros(model.config.codebook_size, dtype=torch.bool)
    for start in range(0, val.shape[0], batch_size):
        x = val[start : start + batch_size].to(model.codebook.device)
        ids = model.code_ids(model.encode(x))
        used[ids.flatten().cpu()] = True
        errors.append(base_reconstruction_error(model, x, code_ids=ids).cpu())
    model.train(was_training)
    return {"val_l1": torch.cat(errors).mean().item(), "val_codes_used": int(used.sum())}


def export_base(model: VQGAN, directory: Path) -> None:
    """``base_config.json`` + ``base.safetensors`` (fp32), written atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(directory / BASE_WEIGHTS, save(weights, metadata={"format": "pt"}))
    model.config.to_json(directory / BASE_CONFIG)


def load_base(directory: str | Path) -> VQGAN:
    """A stage-1 export (``base_config.json`` + ``base.safetensors``) or an ALIT model directory (its ``base``)."""
    directory = Path(directory)
    if (directory / BASE_CONFIG).is_file():
        config = VQGANConfig.from_json(directory / BASE_CONFIG)
        weights = load_file(directory / BASE_WEIGHTS)
    else:
        model_config, all_weights = load_model_files(directory)
        config = model_config.base
        weights = {k[len("base."):]: v for k, v in all_weights.items() if k.startswith("base.")}
    model = VQGAN(config)
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.vq", description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--init", default=None, help="start from this base (stage-1 export or ALIT model folder) "
                                                      "when OUT has no checkpoint; its sizes must match the flags")
    parser.add_argument("--resolution", type=int, default=DEFAULT_BASE.resolution,
                        help="model input size (inference resolution)")
    parser.add_argument("--size", type=int, default=None,
                        help="training crop size at the inference pixel scale (default: --resolution)")
    parser.add_argument("--full-size-frac", type=float, default=0.2,
                        help="last fraction of training on full --resolution crops (batch scaled by pixel count)")
    # architecture flags: the default model's base tokenizer (presets.DEFAULT_BASE) unless given
    parser.add_argument("--ch", type=int, default=DEFAULT_BASE.ch)
    parser.add_argument("--ch-mult", default=",".join(map(str, DEFAULT_BASE.ch_mult)))
    parser.add_argument("--num-res-blocks", type=int, default=DEFAULT_BASE.num_res_blocks)
    parser.add_argument("--norm-groups", type=int, default=DEFAULT_BASE.norm_groups,
                        help="GroupNorm groups (default: the default model's; the authors' 32 makes one channel "
                             "per group at --ch 32)")
    parser.add_argument("--shortcut", choices=("branch", "input"), default=DEFAULT_BASE.shortcut,
                        help="1x1 shortcut of channel-changing residual blocks applied to the block input (default: "
                             "the default model's) or to the branch output (the authors')")
    parser.add_argument("--codebook-dim", type=int, default=DEFAULT_BASE.codebook_dim)
    parser.add_argument("--codebook-size", type=int, default=DEFAULT_BASE.codebook_size)
    parser.add_argument("--ssim-weight", type=float, default=0.2, help="weight of (1 - MS-SSIM)")
    parser.add_argument("--commit-weight", type=float, default=0.25)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--dead-threshold", type=float, default=0.2,
                        help="restart codes whose EMA per-step assignment count falls below this")
    parser.add_argument("--restart-every", type=int, default=25)
    parser.set_defaults(batch_size=8, lr=1e-3, steps=20000)
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    return run_main(parser, parser.parse_args(argv), argv, train)


def train(args: argparse.Namespace) -> dict:
    """Stage 1 through the shared loop (``training.loop``); raises :class:`IncompatibleRun` when ``OUT``'s
    checkpoint or ``--init`` has another architecture than the flags."""
    return loop.train(args, VQStage)


def vq_config(args: argparse.Namespace) -> VQGANConfig:
    """The base tokenizer the architecture flags describe."""
    return VQGANConfig(ch=args.ch, ch_mult=tuple(int(m) for m in args.ch_mult.split(",")),
                       num_res_blocks=args.num_res_blocks, z_channels=args.codebook_dim,
                       codebook_size=args.codebook_size, codebook_dim=args.codebook_dim, resolution=args.resolution,
                       norm_groups=args.norm_groups, shortcut=args.shortcut)


def check_resume(trained: dict, args: argparse.Namespace) -> None:
    """GroupNorm groups do not change tensor shapes, so a mismatch would load silently (a different shortcut would
    not load, but say so plainly); checkpoints from before these flags used the authors' values."""
    for flag, default in (("norm_groups", 32), ("shortcut", "branch")):
        if trained.get(flag, default) != getattr(args, flag):
            raise IncompatibleRun(f"{Path(args.out) / loop.CHECKPOINT} was trained with "
                                  f"--{flag.replace('_', '-')} {trained.get(flag, default)}: resume it the same way")


class VQStage(loop.Stage):
    """Stage 1 for the shared loop: the VQGAN, its AdamW, the EMA codebook; ``--init`` on a fresh run."""

    name = "vq"

    def __init__(self, args: argparse.Namespace, device: torch.device, state: dict | None, log) -> None:
        args.size = args.size or args.resolution
        if state is not None:
            check_resume(state["args"], args)
        self.args, self.device, self.log, self.init_folder = args, device, log, args.init
        self.image_size, self.crop_size = args.resolution, args.size
        self.config = config = vq_config(args)
        self.model = VQGAN(config).to(device)
        self.model.codebook.requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
        self.scaler = make_scaler(device, args.precision)
        self.ema = EMACodebook(config.codebook_size, config.codebook_dim, args.ema_decay, args.dead_threshold, device)
        if state is None and args.init:
            self.start_from(args.init)

    def start_from(self, folder: str) -> None:
        """``--init``: the weights of an exported base of the same architecture; the EMA codebook continues from
        its codebook, every code "alive"."""
        init = load_base(folder)
        if init.config != self.config:
            raise IncompatibleRun(f"--init {folder} has base config {init.config}, this run {self.config}: give the "
                                  "same architecture flags (--ch, --ch-mult, --num-res-blocks, --norm-groups, "
                                  "--shortcut, ...)")
        self.model.load_state_dict(init.state_dict())
        with torch.no_grad():
            self.ema.count.fill_(1.0)
            self.ema.total.copy_(self.model.codebook)
            self.ema.initialised = True
        self.log(f"initialised from {folder}")

    def description(self) -> str:
        return f"VQGAN {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params,"

    def provenance(self) -> dict:
        return {"config": self.config.to_dict(), "parameters": sum(p.numel() for p in self.model.parameters())}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])

    def next_batch(self, stream, step: int, progress: float) -> Tensor:
        """The last ``--full-size-frac`` of training on full ``--resolution`` crops, batch scaled by pixel count."""
        args = self.args
        full = progress >= 1 - args.full_size_frac and args.size != args.resolution
        size = args.resolution if full else args.size
        if stream.size != size:
            stream.size = size
            stream.batch_size = max(1, round(args.batch_size * args.size**2 / size**2))
            self.log(f"step {step}: switching to {size} px crops, batch {stream.batch_size}")
        return stream.next_batch().to(self.device)

    def train_step(self, step: int, pixels: Tensor) -> dict[str, float]:
        loss, parts, flat, ids = vq_step(self.model, self.ema, pixels, self.args, self.device)
        optimizer_step(loss, self.optimizer, self.scaler, self.params, self.args.grad_clip)
        self.ema.update(flat, ids, self.model.codebook.data)
        if (step + 1) % self.args.restart_every == 0:
            parts["restarted"] = float(self.ema.restart_dead(flat, self.model.codebook.data))
        return parts

    def validate(self, val: Tensor, quick: bool) -> dict:
        return evaluate(self.model, val)

    def validation_message(self, metrics: dict) -> str:
        return (f"val L1 {metrics['val_l1']:.4f}, codes used on val {metrics['val_codes_used']}, "
                f"restarts so far {self.ema.restarts}")

    def export(self, out: Path) -> None:
        export_base(self.model, out / "export")
        atomic_write_text(out / "export" / "training_provenance.json", (out / "provenance.json").read_text())


if __name__ == "__main__":
    main()
