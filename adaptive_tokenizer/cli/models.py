"""Commands about models: ``convert``, ``info``, ``models``, ``push``, ``fit-length-predictor``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from tqdm import tqdm

from ..convert import convert_checkpoint
from ..hub import MODEL_FILES, ModelInfo, file_entry, list_pretrained, load_manifest, resolve
from ..io_utils import refuse_inputs_as_outputs, staged_directory
from ..tokenizer import AdaptiveTokenizer
from .common import MODEL_HELP, collect_images, command, load_tokenizer, model_options, positive_int


def convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT.pth")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--encoder-heads", type=int, metavar="N", help="encoder attention heads (default: from preset)")
    p.add_argument("--decoder-heads", type=int, metavar="N", help="decoder attention heads (default: from preset)")
    p.add_argument("--no-dynamic-halting", action="store_true", help="never mask confidently predicted 2D tokens")
    p.add_argument("--halting-confidence", type=float, default=0.55, metavar="P",
                   help="dynamic halting probability threshold (default: 0.55)")


@command("convert", "convert an authors' .pth checkpoint into a model directory",
         convert_arguments)
def cmd_convert(args: argparse.Namespace) -> int:
    """Convert an authors' checkpoint into a model directory."""
    refuse_inputs_as_outputs([Path(args.out_dir) / name for name in MODEL_FILES], [args.checkpoint])
    with staged_directory(args.out_dir) as staging:  # config and weights appear together, or not at all
        config = convert_checkpoint(args.checkpoint, staging, encoder_heads=args.encoder_heads,
                                    decoder_heads=args.decoder_heads, dynamic_halting=not args.no_dynamic_halting,
                                    dynamic_halting_confidence=args.halting_confidence)
    latent = (f"quantized ({config.codebook_size} codes, {config.token_dim}-d)" if config.quantized
              else f"continuous ({config.latent_dim}-d vectors)")
    halting = f"on (p >= {config.dynamic_halting_confidence})" if config.dynamic_halting else "off"
    print(f"converted {args.checkpoint} -> {args.out_dir}: {latent} latents, {config.image_size}px images, "
          f"encoder {config.encoder_width}x{config.encoder_layers}, decoder {config.decoder_width}x"
          f"{config.decoder_layers}, {config.tokens_per_iteration}-{config.max_tokens} tokens "
          f"(steps of {config.tokens_per_iteration}), dynamic halting {halting}")
    return 0


@command("info", "print a model's config and parameter counts",
         model_options)
def cmd_info(args: argparse.Namespace) -> int:
    """Print the model's config (JSON) and its parameter counts."""
    tok = load_tokenizer(args)
    print(json.dumps(tok.config.to_dict(), indent=2))
    print("parameters:")
    for part, count in tok.model.num_parameters().items():
        print(f"  {part:<16}{count:>14,}")
    return 0


def models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", metavar="MANIFEST.json", help="another manifest (default: the shipped one)")


@command("models", "list the pretrained models of the weights manifest",
         models_arguments)
def cmd_models(args: argparse.Namespace) -> int:
    """List the pretrained models of the weights manifest."""
    manifest = load_manifest(args.manifest) if args.manifest else load_manifest()
    entries = list_pretrained(manifest)
    if not entries:
        print(f"no pretrained models in this version's manifest ({manifest.path}); --model also takes a Hub repo "
              "id org/name[@revision] or a directory holding config.json + model.safetensors")
        return 0
    rows = [("NAME", "TOKENS", "LATENT", "WHERE", "DESCRIPTION")]
    rows += [(e.name, f"{e.tokens_min}-{e.tokens_max} (step {e.tokens_step})", e.latent_kind,
              e.where + (" (default)" if e.name == manifest.default else ""), e.description) for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])
    return 0


def push_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="MODEL", help=MODEL_HELP)
    p.add_argument("repo_id", metavar="ORG/NAME")
    p.add_argument("--revision", metavar="BRANCH", help="branch to commit to, created if needed (default: main)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--message", default="Upload ALIT model", help="commit message")
    for flag in ("description", "license", "training-data", "recipe"):
        p.add_argument(f"--{flag}", metavar="TEXT",
                       help=f"model card {flag.replace('-', ' ')} (default: from the manifest entry)")


@command("push", "publish a model to a Hub repo (config, weights, model card)",
         push_arguments)
def cmd_push(args: argparse.Namespace) -> int:
    """Publish a model to a Hub repo with a model card, download it back, print its manifest location and files."""
    tok = AdaptiveTokenizer.from_pretrained(args.model)
    card = {"description": args.description, "license": args.license, "training_data": args.training_data,
            "recipe": args.recipe}
    info = dataclasses.replace(tok.info or ModelInfo(), **{k: v for k, v in card.items() if v is not None})
    commit = tok.push_to_hub(args.repo_id, revision=args.revision, private=args.private or None,
                             commit_message=args.message, info=info)
    pushed = resolve(f"{args.repo_id}@{commit.oid}").directory
    files = {name: dataclasses.asdict(file_entry(pushed / name)) for name in MODEL_FILES}
    print(f"pushed {args.model} -> {args.repo_id} at commit {commit.oid} ({commit.commit_url})")
    print("manifest location and files (downloaded back from the Hub):")
    print(json.dumps({"location": {"repo_id": args.repo_id, "revision": commit.oid}, "files": files}, indent=2))
    return 0


def fit_length_predictor_arguments(p: argparse.ArgumentParser) -> None:
    model_options(p)
    p.add_argument("inputs", nargs="+", metavar="PHOTOS", help="image files or folders of images")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the model with its predictor")
    p.add_argument("--crops", type=int, default=0, metavar="N",
                   help="random crops per image, beside the centre crop and its mirror image (default: 0)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="share of the images held out to select the predictor (default: 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit-steps", type=positive_int, default=1500, metavar="N",
                   help="optimizer steps per candidate head (default: 1500)")
    p.add_argument("--measurements", metavar="FILE.safetensors",
                   help="cache of the measured errors: written after measuring, read instead of measuring again")
    p.add_argument("--cross-validate", type=int, default=0, metavar="K",
                   help="also refit the selected head K times, each without one of K folds of the photos, and report "
                        "the predicted rule on the out-of-fold estimates (fit_report.json: cross_validation)")


@command("fit-length-predictor", "fit a length predictor (length_rule='predicted') for a model on photos; writes the "
                                 "model with it",
         fit_length_predictor_arguments)
def cmd_fit_length_predictor(args: argparse.Namespace) -> int:
    """Fit a length predictor for a model on a set of photos and write the model with it."""
    from ..fit_length_predictor import fit_length_predictor

    sources = collect_images(args.inputs)
    tok = load_tokenizer(args)
    with tqdm(total=len(sources), unit="img", desc="measuring", file=sys.stderr, disable=None) as bar:
        report = fit_length_predictor(tok, sources, args.output, crops=args.crops, val_fraction=args.val_fraction,
                                      seed=args.seed, measurements=args.measurements, steps=args.fit_steps,
                                      folds=args.cross_validate, progress=bar.update)
    chosen = report["candidates"][[(c["features"], c["hidden"]) for c in report["candidates"]].index(
        (report["selected"]["features"], report["selected"]["hidden"]))]
    print(f"fitted a length predictor on {report['num_train_views']} views; held out {report['num_val_images']} "
          f"images: lengths within one iteration of the exact rule {chosen['within_one']:.1%}, same "
          f"{chosen['same']:.1%}, MAE {chosen['mae']:.4f}; safety margin {report['selected']['margin']:g} "
          f"-> {args.output}")
    for row in report.get("cross_validation", {}).get("targets", []):
        print(f"out of fold ({args.cross_validate} folds), {row['mean_tokens']} mean tokens: {row['share']:.1%} reach "
              f"the target, fixed {row['fixed_budget']} {row['fixed_share']:.1%}; within one iteration of the exact "
              f"rule {row['within_one_of_exact']:.1%}")
    return 0
