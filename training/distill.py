"""Stage 2: latent distillation (the paper's recipe) of an ALIT model on a frozen base tokenizer.

    python -m training.distill --data ../shared/corpus/photos --base ../runs/vq/export --out ../runs/alit \
        [--max-minutes 60 --threads 1]

Trains ``adaptive_tokenizer.model.ALITModel`` (default: the embedded default model's configuration, cached
rollout, quantized latents) with ``base`` frozen:

- encoder: ``embed_image`` + one block-causal pass (``forward_block_causal``) giving the latents of all
  ``max_iterations`` iterations at once; the tokens of iteration t are the first ``T * (t + 1)``;
- quantizer: l2-normalised codebook trained here with a straight-through estimator, commitment + codebook losses
  and dead-code restarts (the library's ``LatentQuantizer`` is inference-only);
- decoder: for a random subset of ``--iters-per-step`` iterations per step, logits over the base codebook from
  the first ``T * (t + 1)`` code vectors; loss ``w_t * (ce_weight * CE_smoothed(logits, base ids) + code_weight *
  MSE(softmax(logits) @ base codebook, base code vectors))`` with the authors' weights
  ``[2.5, 2.0, 1.5, 1.25, 1, 1, 1, 1]`` (``--iteration-weights`` to change them), normalised by the sum of the
  sampled weights.

Optional stage 3 (``--pixel-weight > 0``): adds ``L1 + ssim_weight * (1 - MS-SSIM)`` of ``model.reconstruct``
(the base decoder of the expected code) against the pixels, back-propagated into the ALIT decoder/encoder
(the base stays frozen unless ``--train-base-decoder``, which also fine-tunes the base decoder, at
``--base-decoder-lr-scale`` times the learning rate, on these reconstructions and, with the same pixel weight, on
the base's own codes so that the base tokenizer's reconstruction stays a true ceiling).

Output (``--out``): ``checkpoint.pt`` (resumable), ``export/`` (``AdaptiveTokenizer.save_pretrained``: fp32,
loadable by ``AdaptiveTokenizer.from_pretrained``), ``export-fp16/`` (compact fp16 weights to ship/commit),
``provenance.json``, ``split.json``, ``metrics.jsonl``. ``--init DIR`` starts from an exported model (e.g. the
committed default weights) when the run folder has no checkpoint: that is how training continues across sessions.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from adaptive_tokenizer.codebook import nearest_code
from adaptive_tokenizer.config import ModelConfig
from adaptive_tokenizer.model import ALITModel, base_reconstruction
from adaptive_tokenizer.presets import default_model
from adaptive_tokenizer.serialization import save_model_files
from adaptive_tokenizer.tokenizer import AdaptiveTokenizer

from . import loop
from .alit_init import INIT_SCHEMES, init_alit_weights, start_from
from .common import (add_common_args, atomic_write_text, autocast, iteration_weights, loss_weight, make_scaler,
                     optimizer_step, repo_relative)
from adaptive_tokenizer.metrics import chroma, colour_offset, gradient_magnitude, is_greyscale, l1_error

from .losses import smoothed_cross_entropy
from .loop import IncompatibleRun, run_main
from .stage3 import Adversary, base_decoder_terms, load_discriminator, pixel_terms, save_discriminator
from .vq import load_base

ITERATION_WEIGHTS = (2.5, 2.0, 1.5, 1.25, 1.0, 1.0, 1.0, 1.0)  # the authors' per-iteration loss weights


class QuantizerTrainer:
    """Training side of the l2-normalised latent quantizer: STE, commitment/codebook losses, dead-code restarts.

    Usage is tracked as an EMA of per-step assignment counts; codes below ``dead_threshold`` are moved onto random
    (normalised) token vectors of the batch and their Adam moments reset. ``init_from_data``: before the first
    step the whole codebook is placed on the first batch's token vectors (with a little noise), as k-means-style
    initialisations do, instead of random directions that the encoder's early outputs all fall between.
    """

    def __init__(self, size: int, decay: float = 0.99, dead_threshold: float = 0.02, device=None,
                 init_from_data: bool = False):
        self.usage = torch.full((size,), 2 * dead_threshold, device=device)
        self.decay, self.dead_threshold = decay, dead_threshold
        self.restarts = 0
        self.needs_init = init_from_data

    def state_dict(self) -> dict:
        return {"usage": self.usage, "restarts": self.restarts, "needs_init": self.needs_init}

    def load_state_dict(self, state: dict) -> None:
        self.usage.copy_(state["usage"])
        self.restarts = state["restarts"]
        self.needs_init = state.get("needs_init", False)

    @torch.no_grad()
    def place_codes(self, model: ALITModel, normalised: Tensor, codes: Tensor) -> None:
        """Move ``codes`` (indices) onto random rows of ``normalised`` token vectors, plus 0.01 noise."""
        flat = normalised.reshape(-1, normalised.shape[-1])
        picks = flat[torch.randint(0, flat.shape[0], (codes.numel(),), device=flat.device)]
        picks = F.normalize(picks + 0.01 * torch.randn_like(picks), dim=-1)
        model.quantizer.codebook[codes] = picks.to(model.quantizer.codebook.dtype)

    def __call__(self, model: ALITModel, vectors: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``vectors [N, L, D]`` -> (decoder inputs with STE, ids, quantizer loss, normalised vectors)."""
        z = F.normalize(vectors.float(), dim=-1)
        if self.needs_init:
            self.place_codes(model, z.detach(), torch.arange(model.quantizer.codebook.shape[0], device=z.device))
            self.needs_init = False
        codebook = F.normalize(model.quantizer.codebook.float(), dim=-1)
        flat = z.reshape(-1, z.shape[-1])
        with torch.no_grad():
            ids = nearest_code(flat, codebook)
            counts = torch.bincount(ids, minlength=codebook.shape[0]).float()
            self.usage.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        q = codebook[ids].view_as(z)
        loss = beta * F.mse_loss(z, q.detach()) + F.mse_loss(q, z.detach())
        return z + (q - z).detach(), ids.view(z.shape[:-1]), loss, z.detach()

    @torch.no_grad()
    def restart_dead(self, model: ALITModel, normalised: Tensor, optimizer: torch.optim.Optimizer) -> int:
        dead = (self.usage < self.dead_threshold).nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        self.place_codes(model, normalised, dead)
        state = optimizer.state.get(model.quantizer.codebook, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][dead] = 0
        self.usage[dead] = 2 * self.dead_threshold
        self.restarts += dead.numel()
        return dead.numel()


def distill_step(model: ALITModel, quantizer: QuantizerTrainer, pixels: Tensor, args: argparse.Namespace,
                 device: torch.device, iterations: list[int], quantize: bool = True,
                 adversary: Adversary | None = None) -> tuple[Tensor, dict[str, float], Tensor]:
    """One step's loss. ``quantize=False`` (warm-up, ``--quantize-after``): the decoder reads the l2-normalised
    vectors themselves while the codebook still learns to follow them. ``adversary``: collects the step's
    reconstructions (detached) for its discriminator step and, when ``adversary.generator_on``, adds the
    adaptive-weighted generator term."""
    config = model.config
    T = config.tokens_per_iteration
    with torch.no_grad():
        features = model.base.encode(pixels).float()  # base frozen, fp32: targets identical to inference
        target_ids = model.base.code_ids(features)
        base_codebook = model.base.codebook.float()
        target_vectors = base_codebook[target_ids]
    with autocast(device, args.precision):
        prefix = model.encoder.embed_image(pixels, features)
        latents = model.encoder.forward_block_causal(prefix, max(iterations) + 1)
        vectors = model.encoder.to_token_vectors(latents)
    decoder_inputs, ids, q_loss, normalised = quantizer(model, vectors, args.commit_weight)
    if not quantize:
        decoder_inputs = F.normalize(vectors.float(), dim=-1)
    total, weight_sum, parts = 0.0, 0.0, {}
    pixel_total, adversarial_total = 0.0, 0.0  # as they enter the loss (before normalising by weight_sum)
    for t in iterations:
        with autocast(device, args.precision):
            logits = model.decoder(decoder_inputs[:, : T * (t + 1)])
        logits = logits.float()
        ce = smoothed_cross_entropy(logits, target_ids, args.label_smoothing)
        expected = torch.softmax(logits, dim=-1) @ base_codebook
        mse = F.mse_loss(expected, target_vectors)
        loss_t = args.ce_weight * ce + args.code_weight * mse
        if args.pixel_weight > 0:
            with autocast(device, args.precision):
                recon = model.base.decode_features(expected)
            pixel_loss, pix = pixel_terms(recon, pixels, args, parts)
            loss_t = loss_t + args.pixel_weight * pixel_loss
            parts[f"pl1_{t}"] = pix["l1"]
        w = args.iteration_weights[t] if t < len(args.iteration_weights) else 1.0
        if args.pixel_weight > 0:
            pixel_total = pixel_total + w * args.pixel_weight * pixel_loss
            if adversary is not None:
                adversary.fakes.append(recon.detach().float())
                if adversary.generator_on:
                    adversarial_total = adversarial_total + w * adversary.generator_term(recon)
        total = total + w * loss_t
        weight_sum += w
        with torch.no_grad():
            parts.setdefault("acc", 0.0)
            parts["acc"] += (logits.argmax(-1) == target_ids).float().mean().item() / len(iterations)
            parts.setdefault("ce", 0.0)
            parts["ce"] += ce.item() / len(iterations)
            parts.setdefault("mse", 0.0)
            parts["mse"] += mse.item() / len(iterations)
    loss = total / weight_sum + args.quant_weight * q_loss
    if args.train_base_decoder:  # the fine-tuned base decoder must still decode the base's own codes
        loss = base_decoder_terms(loss, model, pixels, target_vectors, args, device, parts, pixel_total / weight_sum,
                                  adversarial_total / weight_sum, adversary)
    parts.update(loss=loss.item(), qloss=q_loss.item(),
                 codes=float(torch.unique(ids).numel()))
    return loss, parts, normalised


def sample_iterations(gen: random.Random, max_iterations: int, k: int) -> list[int]:
    return sorted(gen.sample(range(max_iterations), min(k, max_iterations)))


@torch.no_grad()
def evaluate(model: ALITModel, val: Tensor, batch_size: int = 16, iterations: tuple[int, ...] | None = None) -> dict:
    """Mean L1 of the clamped reconstruction at each budget (cached rollout = prefixes of one block-causal pass,
    quantized with the library's own quantizer), and of the base tokenizer's own reconstruction, in fp32; beside
    it (``adaptive_tokenizer.metrics``) the sharpness (mean grey gradient magnitude over the inputs'), the mean
    colour offset and, over the greyscale inputs if any, the mean chroma. ``iterations``: which budgets (0-based
    iteration indices; default all)."""
    was_training = model.training
    model.eval()
    config = model.config
    T, I = config.tokens_per_iteration, config.max_iterations
    errors = {t: [] for t in (range(I) if iterations is None else iterations)}
    base_errors, used = [], torch.zeros(config.codebook_size, dtype=torch.bool)
    keys = [*errors, "base"]
    gradients, offsets, chromas = ({key: [] for key in keys} for _ in range(3))
    input_gradients, greyscale = [], []
    for start in range(0, val.shape[0], batch_size):
        x = val[start : start + batch_size].to(model.base.codebook.device)
        features = model.base.encode(x)
        base_recon = base_reconstruction(model.base, x, features=features)
        base_errors.append(l1_error(base_recon, x))
        input_gradients.append(gradient_magnitude(x))
        greyscale.append(is_greyscale(x))
        recons = {"base": base_recon}
        latents = model.encoder.forward_block_causal(model.encoder.embed_image(x, features), I)
        ids = model.quantizer.quantize(model.encoder.to_token_vectors(latents))
        used[ids.flatten().cpu()] = True
        inputs = model.decoder_inputs(ids)
        for t in errors:
            recon = model.reconstruct(model.decoder(inputs[:, : T * (t + 1)])).clamp(0, 1)
            errors[t].append(l1_error(recon, x))
            recons[t] = recon
        for key, recon in recons.items():
            gradients[key].append(gradient_magnitude(recon))
            offsets[key].append(colour_offset(recon, x))
            chromas[key].append(chroma(recon))
    model.train(was_training)
    out = {f"val_l1_{T * (t + 1)}": torch.cat(e).mean().item() for t, e in errors.items()}
    out["val_l1_base"] = torch.cat(base_errors).mean().item()
    input_gradient, greyscale = torch.cat(input_gradients).sum(), torch.cat(greyscale)
    for key in keys:
        name = key if key == "base" else T * (key + 1)
        out[f"val_sharp_{name}"] = (torch.cat(gradients[key]).sum() / input_gradient).item()
        out[f"val_offset_{name}"] = torch.cat(offsets[key]).mean().item()
        if greyscale.any():
            out[f"val_grey_chroma_{name}"] = torch.cat(chromas[key])[greyscale].mean().item()
    out["val_codes_used"] = int(used.sum())
    return out


def export_model(model: ALITModel, out: Path) -> None:
    """``export/`` (fp32, via ``AdaptiveTokenizer.save_pretrained``) and ``export-fp16/`` (compact fp16), each
    with ``training_provenance.json`` (the run's provenance record: data, sources and licences, sessions)."""
    clone = copy.deepcopy(model).float().cpu()
    AdaptiveTokenizer(clone).save_pretrained(out / "export")
    weights = {k: v.detach().half() for k, v in clone.state_dict().items()}
    save_model_files(out / "export-fp16", clone.config, weights)
    if (out / "provenance.json").is_file():
        for folder in ("export", "export-fp16"):
            atomic_write_text(out / folder / "training_provenance.json", (out / "provenance.json").read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.distill", description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--base", required=True, help="stage-1 export folder (or an ALIT model folder: its base)")
    parser.add_argument("--init", default=None,
                        help="start from this exported ALIT model's encoder/decoder/quantizer weights when OUT has no "
                             "checkpoint (the base is --base's: trained further since, or a new architecture)")
    parser.add_argument("--config", default=None, help="ModelConfig JSON overriding the default (its base is "
                                                        "replaced by the --base tokenizer's)")
    parser.add_argument("--init-scheme", choices=INIT_SCHEMES, default="small",
                        help="initialisation of a fresh model (see init_alit_weights)")
    parser.add_argument("--attention-gain", type=float, default=8.0,
                        help="--init-scheme local: query scale of the position-routed attention at step 0")
    parser.add_argument("--codebook-init", choices=["data", "random"], default="data",
                        help="fresh runs: latent codebook on the first batch's token vectors, or random directions")
    parser.add_argument("--iters-per-step", type=int, default=2, help="random iterations decoded per step")
    parser.add_argument("--quantize-after", type=int, default=0,
                        help="warm-up steps in which the decoder reads unquantized (normalised) vectors")
    parser.add_argument("--iteration-weights", type=iteration_weights, default=ITERATION_WEIGHTS,
                        help="comma-separated loss weight of each iteration (later ones: 1); default the authors' "
                             + ",".join(f"{w:g}" for w in ITERATION_WEIGHTS))
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--ce-weight", type=loss_weight, default=1.0,
                        help="weight of the cross-entropy on base codes (stage 3 may lower it to let pixels lead)")
    parser.add_argument("--code-weight", type=loss_weight, default=1.0, help="weight of the code regression MSE")
    parser.add_argument("--quant-weight", type=float, default=1.0)
    parser.add_argument("--commit-weight", type=float, default=0.25)
    parser.add_argument("--dead-threshold", type=float, default=0.02)
    parser.add_argument("--restart-every", type=int, default=50)
    parser.add_argument("--pixel-weight", type=loss_weight, default=0.0, help="stage 3: pixel loss weight (0: off)")
    parser.add_argument("--ssim-weight", type=float, default=0.2)
    parser.add_argument("--train-base-decoder", action="store_true",
                        help="stage 3: also fine-tune the base decoder (needs --pixel-weight > 0)")
    parser.add_argument("--base-decoder-lr-scale", type=float, default=0.2,
                        help="--train-base-decoder: the base decoder's learning rate as a fraction of --lr")
    parser.add_argument("--grad-weight", type=loss_weight, default=0.0,
                        help="stage 3: weight of the local gradient-energy term inside the pixel loss (0: off)")
    parser.add_argument("--colour-weight", type=loss_weight, default=0.0,
                        help="stage 3: weight of the colour term (chroma map + channel means) in the pixel loss")
    parser.add_argument("--disc-weight", type=loss_weight, default=0.0,
                        help="stage 3: patch discriminator, its generator term x taming's adaptive weight (0: off; "
                             "needs --train-base-decoder, whose output layer the adaptive weight is measured at)")
    parser.add_argument("--disc-start", type=int, default=0,
                        help="global step from which the generator term is on (the discriminator trains from the "
                             "first step of the run)")
    parser.add_argument("--disc-ramp", type=int, default=0,
                        help="raise the generator term linearly from 0 over this many steps after --disc-start "
                             "(0: at full weight at once)")
    parser.add_argument("--disc-lr", type=float, default=1e-4, help="the discriminator's learning rate (constant)")
    parser.add_argument("--disc-channels", type=int, default=32, help="the discriminator's first width")
    parser.add_argument("--disc-layers", type=int, default=3, help="the discriminator's stride-2 layers")
    parser.add_argument("--init-discriminator", default=None,
                        help="start the discriminator from this safetensors file (a run's discriminator.safetensors) "
                             "when OUT has no checkpoint")
    parser.set_defaults(batch_size=8, lr=4e-4, warmup=100, steps=20000, weight_decay=0.05, min_scale=0.7)
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.train_base_decoder and args.pixel_weight <= 0:
        parser.error("--train-base-decoder needs --pixel-weight > 0 (the base decoder learns from pixel losses only)")
    if args.disc_weight > 0 and not args.train_base_decoder:
        parser.error("--disc-weight needs --train-base-decoder (the adaptive weight is measured at its output layer)")
    return run_main(parser, args, argv, train)


def train(args: argparse.Namespace) -> dict:
    """Stages 2/3 through the shared loop (``training.loop``); raises :class:`IncompatibleRun` when ``OUT``'s
    checkpoint was trained otherwise with respect to ``--train-base-decoder``, or ``--init`` does not fit."""
    return loop.train(args, DistillStage)


def model_config(args: argparse.Namespace, base_config) -> ModelConfig:
    """``--config`` (its base replaced by the ``--base`` tokenizer's) or the default model's on that base."""
    if args.config:
        return ModelConfig.from_json(args.config).replace(base=base_config)
    return default_model(base_config)


def make_optimizer(model: ALITModel, args: argparse.Namespace) -> tuple[list[Tensor], torch.optim.Optimizer]:
    """AdamW without weight decay on norms, biases, embeddings and the codebook; the base decoder (stage 3) at
    ``--base-decoder-lr-scale``. Returns (the trained parameters, the optimizer)."""
    decay, no_decay, base_decoder = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or name.endswith(("embedding", "codebook", "latent_tokens", "mask_token"))
        (base_decoder if name.startswith("base.decoder.") else no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if base_decoder:
        groups.append({"params": base_decoder, "weight_decay": 0.0, "lr_scale": args.base_decoder_lr_scale})
    return decay + no_decay + base_decoder, torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99))


class DistillStage(loop.Stage):
    """Stages 2/3 for the shared loop: the ALIT model on the frozen ``--base`` (its decoder trained with
    ``--train-base-decoder``), the latent quantizer's training state, the adversary (``--disc-weight > 0``)."""

    name = "distill"

    def __init__(self, args: argparse.Namespace, device: torch.device, state: dict | None, log) -> None:
        fresh = state is None
        trained_with = not fresh and state["args"].get("train_base_decoder", False)
        if not fresh and trained_with != args.train_base_decoder:
            raise IncompatibleRun(f"{Path(args.out) / loop.CHECKPOINT} was trained "
                                  f"{'with' if trained_with else 'without'} --train-base-decoder: "
                                  "resume it the same way, or start a new --out with --init")
        self.args, self.device, self.base_folder, self.init_folder = args, device, args.base, args.init
        base = load_base(args.base)
        self.config = config = model_config(args, base.config)
        self.image_size = self.crop_size = config.image_size
        self.model = model = ALITModel(config)
        init_alit_weights(model, args.seed, args.init_scheme, args.attention_gain)
        model.base.load_state_dict(base.state_dict())
        if args.init and fresh:
            start_from(model, args.init)
        model.to(device)
        model.base.requires_grad_(False)
        model.base.eval()
        if args.train_base_decoder:
            model.base.decoder.requires_grad_(True)
        self.params, self.optimizer = make_optimizer(model, args)
        self.scaler = make_scaler(device, args.precision)
        self.quantizer = QuantizerTrainer(config.codebook_size, dead_threshold=args.dead_threshold, device=device,
                                          init_from_data=not args.init and fresh and args.codebook_init == "data")
        self.adversary = Adversary(args, device) if args.disc_weight > 0 else None
        if self.adversary is not None and args.init_discriminator and fresh:
            load_discriminator(self.adversary, args.init_discriminator)
        self.iteration_gen = random.Random(args.seed + 1)

    def description(self) -> str:
        return f"ALIT parameters {json.dumps(self.model.num_parameters())};"

    def provenance(self) -> dict:
        return {"config": self.config.to_dict(), "parameters": self.model.num_parameters(),
                "base": repo_relative(self.args.base), "init": self.args.init}

    def state_dict(self) -> dict:
        extra = {"adversary": self.adversary.state_dict()} if self.adversary is not None else {}
        return {"model": self.model.state_dict(), "quantizer": self.quantizer.state_dict(),
                "iteration_gen": self.iteration_gen.getstate(), **extra}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.quantizer.load_state_dict(state["quantizer"])
        self.iteration_gen.setstate(state["iteration_gen"])
        if self.adversary is not None and "adversary" in state:
            self.adversary.load_state_dict(state["adversary"])

    def start(self) -> None:
        self.model.train()
        self.model.base.eval()

    def train_step(self, step: int, pixels: Tensor) -> dict[str, float]:
        args, adversary = self.args, self.adversary
        iterations = sample_iterations(self.iteration_gen, self.config.max_iterations, args.iters_per_step)
        if adversary is not None:
            adversary.follow_schedule(step)
        loss, parts, normalised = distill_step(self.model, self.quantizer, pixels, args, self.device, iterations,
                                               quantize=step >= args.quantize_after, adversary=adversary)
        optimizer_step(loss, self.optimizer, self.scaler, self.params, args.grad_clip)
        if adversary is not None:
            parts.update(adversary.train_step(pixels))
        if (step + 1) % args.restart_every == 0:
            parts["restarted"] = float(self.quantizer.restart_dead(self.model, normalised, self.optimizer))
        return {k: v for k, v in parts.items() if not k.startswith("pl1_")}

    def record(self) -> dict:
        return {"restarts": self.quantizer.restarts}

    def validate(self, val: Tensor, quick: bool) -> dict:
        """Every budget; ``quick``: 32, 64, 128, 256 tokens (by default)."""
        last = self.config.max_iterations - 1
        return evaluate(self.model, val, iterations=tuple(sorted({0, min(1, last), min(3, last), last}))
                        if quick else None)

    def export(self, out: Path) -> None:
        export_model(self.model, out)
        if self.adversary is not None:
            save_discriminator(self.adversary, out)


if __name__ == "__main__":
    main()
