"""Ship a trained model inside the package: fp16 weights, model card, and its weights-manifest entry.

    python -m training.ship --model ../runs/alit/export --name alit-photos-128 --default \
        --description "..." --training-data "..." --recipe "..."

The export may carry a length predictor (``adaptive-tokenizer fit-length-predictor``): it is shipped with it.

Writes ``adaptive_tokenizer/weights/NAME/`` (``config.json``, fp16 ``model.safetensors``, ``README.md`` card,
``training_provenance.json`` when the export has one), then the entry (sizes, sha256, licence, provenance) into both
copies of ``weights_manifest.json`` (top level and inside the package, kept identical), and finally loads the model
back through ``AdaptiveTokenizer.from_pretrained(NAME)`` (checksums verified) to prove the entry.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import torch

from adaptive_tokenizer import AdaptiveTokenizer
from adaptive_tokenizer.hub import CARD_NAME, CONFIG_NAME, MANIFEST_PATH, WEIGHTS_NAME, ModelInfo, file_entry, \
    render_model_card
from adaptive_tokenizer.io_utils import write_atomic
from adaptive_tokenizer.serialization import save_model_files

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_MEGABYTES = 25.0


def ship(model_dir: Path, name: str, *, description: str, license: str, training_data: str, recipe: str,
         default: bool, package_dir: Path = MANIFEST_PATH.parent,
         manifest_copies: tuple[Path, ...] = (MANIFEST_PATH, REPO_ROOT / "weights_manifest.json")) -> dict:
    """Copy ``model_dir`` (a ``save_pretrained`` export) into the package as fp16 and register it; returns the
    manifest entry."""
    tok = AdaptiveTokenizer.from_pretrained(model_dir)
    config = tok.config
    weights = {key: value.detach().to(torch.float16) for key, value in tok.model.state_dict().items()}
    target = package_dir / "weights" / name
    if target.resolve() == Path(model_dir).resolve():
        raise ValueError(f"--model {model_dir} is the folder being shipped to; export or copy it elsewhere first")
    if target.exists():
        shutil.rmtree(target)
    save_model_files(target, config, weights)
    info = ModelInfo(description=description, license=license, training_data=training_data, recipe=recipe, name=name)
    write_atomic(target / CARD_NAME, render_model_card(config, info, load_as=name).encode())
    provenance = model_dir / "training_provenance.json"
    if provenance.is_file():
        shutil.copyfile(provenance, target / provenance.name)
    megabytes = sum(p.stat().st_size for p in target.iterdir()) / 1e6
    if megabytes > MAX_MEGABYTES:
        raise ValueError(f"{target} holds {megabytes:.1f} MB, over the {MAX_MEGABYTES} MB budget")

    entry = {
        "description": description, "image_size": config.image_size,
        "tokens": {"min": config.tokens_per_iteration, "max": config.max_tokens, "step": config.tokens_per_iteration},
        "latent_kind": config.latent_kind, "rollout_kind": config.rollout,
        "location": {"embedded": f"weights/{name}"},
        "files": {file: dataclasses.asdict(file_entry(target / file)) for file in (CONFIG_NAME, WEIGHTS_NAME)},
        "license": license, "provenance": {"training_data": training_data, "recipe": recipe},
    }
    manifest = json.loads(manifest_copies[0].read_text())
    manifest["models"][name] = entry
    if default:
        manifest["default"] = name
    text = json.dumps(manifest, indent=2) + "\n"
    for copy in manifest_copies:
        write_atomic(copy, text.encode())

    loaded = AdaptiveTokenizer.from_pretrained(name, manifest=manifest_copies[0])  # verifies the checksums
    assert loaded.config == config
    print(f"shipped {name}: {megabytes:.1f} MB in {target}" + (" (default)" if default else ""))
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="export folder (config.json + model.safetensors)")
    parser.add_argument("--name", required=True, help="manifest name, e.g. alit-photos-128")
    parser.add_argument("--default", action="store_true", help="make it the model from_pretrained() loads")
    parser.add_argument("--description", required=True)
    parser.add_argument("--license", default="other", help="Hub licence id of the weights (default: other)")
    parser.add_argument("--training-data", required=True, help="sources and licences of the training images")
    parser.add_argument("--recipe", required=True, help="the commands that trained the model")
    args = parser.parse_args()
    ship(args.model, args.name, description=args.description, license=args.license,
         training_data=args.training_data, recipe=args.recipe, default=args.default)


if __name__ == "__main__":
    main()
