"""What packing buys a VLM trained on adaptive-length image tokens: training images/s side by side, one process.

    python scripts/vlm_packing_bench.py --images PHOTOS_DIR --limit 300 [--halt-threshold 0.0629] [--threads 2]

Fixed set-up (so the figure means something): a ``LlamaForCausalLM`` of 4 layers x 256 wide (4 heads, MLP 688),
vocabulary 32,000 (text ids, then ``<boi>``, ``<eoi>``, ``<image>`` and the image codes, as
``adaptive_tokenizer.vlm`` maps them), ``sdpa`` attention, AdamW, 16 images per step, fp32 CPU. Every row is a
prompt of 8 text ids then ``<boi> image ids <eoi>``; the loss covers every token but padding. Modes:

(a) ``fixed256``: every image at 256 tokens (rows of equal length, no padding);
(b) ``padded``: adaptive lengths (the verified rule at ``--halt-threshold``), random batches padded to their longest;
(c) ``packed<C>``: the same batches packed by ``pack_rows`` into rows of ``C`` tokens (4-D block-diagonal mask);
(d) ``grouped``: adaptive lengths batched by ``length_grouped_sampler`` (similar lengths), padded to their longest.

The modes run in turns (``--rounds`` rounds of ``--steps`` steps each, after one warm-up step), and the median of
the rounds is kept; each step's time is split into building the batch, forward, backward and optimizer step.
Also printed: the share of images whose reconstruction error meets ``--halt-threshold`` at their length (the fixed
256 tokens, or the adaptive length). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adaptive_tokenizer import AdaptiveTokenizer
from adaptive_tokenizer.image_io import list_image_files, load_images
from adaptive_tokenizer.rollout import pixel_errors
from adaptive_tokenizer.vlm import length_grouped_sampler, pack_rows

VOCAB, WIDTH, LAYERS, HEADS, MLP, BATCH, PROMPT = 32_000, 256, 4, 4, 688, 16, 8


def tokenize(tok: AdaptiveTokenizer, paths: list[str], threshold: float) -> dict:
    """Fixed-256 and adaptive tokens of every photo, and whether each meets ``threshold``."""
    adaptive_codes, fixed_codes, adaptive_met, fixed_met = [], [], [], []
    for start in range(0, len(paths), 32):
        pixels = load_images(paths[start : start + 32], tok.config.image_size)
        adaptive = tok.encode(pixels, halt_threshold=threshold)
        fixed = tok.encode(pixels, budget=tok.max_tokens)
        with torch.inference_mode():  # the measured error at 256 tokens, as the length rules measure it
            ids = torch.stack(fixed.tokens)
            logits = tok.model.decoder(tok.model.decoder_inputs(ids)).float()
            errors = pixel_errors(tok.model, logits, pixels)
        adaptive_codes += adaptive.tokens
        fixed_codes += fixed.tokens
        adaptive_met += (adaptive.errors <= threshold).tolist()
        fixed_met += (errors <= threshold).tolist()
    return {"adaptive": adaptive_codes, "fixed": fixed_codes, "rule": adaptive.length_rule,
            "adaptive_share": sum(adaptive_met) / len(paths), "fixed_share": sum(fixed_met) / len(paths)}


def rows_of(codes: list[torch.Tensor], codebook_size: int, seed: int = 0) -> list[torch.Tensor]:
    """``prompt <boi> image ids <eoi>`` per image, in the 32k vocabulary (image code c is id offset + c)."""
    offset = VOCAB - codebook_size
    boi, eoi = offset - 3, offset - 2
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, offset - 3, (len(codes), PROMPT), generator=generator)
    return [torch.cat([p, torch.tensor([boi]), c + offset, torch.tensor([eoi])]) for p, c in zip(prompts, codes)]


def padded_batch(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, 2-D ``attention_mask`` and ``labels`` (-100 on padding)."""
    longest = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def step_times(model, optimizer, make_batch) -> tuple[dict[str, float], int]:
    """One training step: seconds per part, and the tokens the model computed (padding included)."""
    times = {}
    start = time.perf_counter()
    batch = make_batch()
    times["batch"] = time.perf_counter() - start
    start = time.perf_counter()
    loss = model(**batch).loss
    times["forward"] = time.perf_counter() - start
    start = time.perf_counter()
    loss.backward()
    times["backward"] = time.perf_counter() - start
    start = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times["optimizer"] = time.perf_counter() - start
    return times, batch["input_ids"].numel()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="a folder of photos")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--halt-threshold", type=float, default=0.0629)
    parser.add_argument("--model", default=None, help="the image tokenizer (default: the embedded default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--capacities", default="266,532", help="packed row lengths to time")
    parser.add_argument("--cache", default=None, help="a .pt file keeping the tokens between runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = AdaptiveTokenizer.from_pretrained(args.model)
    paths = [str(p) for p in list_image_files(args.images)[: args.limit]]
    key = {"paths": paths, "threshold": args.halt_threshold, "model": args.model}
    cached = torch.load(args.cache, weights_only=True) if args.cache and Path(args.cache).is_file() else None
    if cached is not None and cached["key"] == key:
        tokens = cached["tokens"]
    else:
        tokens = tokenize(tok, paths, args.halt_threshold)
        if args.cache:
            torch.save({"key": key, "tokens": tokens}, args.cache)
    codebook = tok.config.codebook_size
    adaptive, fixed = rows_of(tokens["adaptive"], codebook), rows_of(tokens["fixed"], codebook)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(adaptive), generator=generator).tolist()
    grouped = list(length_grouped_sampler([len(r) for r in adaptive], BATCH, generator=generator))
    batches = {"fixed256": [[fixed[i] for i in order[s : s + BATCH]] for s in range(0, len(order), BATCH)],
               "padded": [[adaptive[i] for i in order[s : s + BATCH]] for s in range(0, len(order), BATCH)],
               "grouped": [[adaptive[i] for i in grouped[s : s + BATCH]] for s in range(0, len(grouped), BATCH)]}
    makers = {"fixed256": lambda rows: padded_batch(rows), "padded": lambda rows: padded_batch(rows),
              "grouped": lambda rows: padded_batch(rows)}
    for capacity in [int(c) for c in args.capacities.split(",")]:
        batches[f"packed{capacity}"] = batches["padded"]
        makers[f"packed{capacity}"] = lambda rows, c=capacity: pack_rows(rows, c)[0]
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=2048,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    full = [b for b in batches["padded"] if len(b) == BATCH]
    print(f"{len(paths)} photos, {tokens['rule']} rule at E={args.halt_threshold}: mean "
          f"{sum(len(t) for t in tokens['adaptive']) / len(paths):.1f} image tokens; {args.threads} threads, "
          f"batch {BATCH}, {args.rounds} rounds x {args.steps} steps")
    rounds: dict[str, list[tuple[float, dict[str, float], int]]] = {mode: [] for mode in batches}
    for mode in batches:  # warm-up: one step each
        step_times(model, optimizer, lambda: makers[mode](batches[mode][0]))
    for r in range(args.rounds):
        for mode, mode_batches in batches.items():
            mode_batches = [b for b in mode_batches if len(b) == BATCH]
            parts, computed = {}, 0
            for s in range(args.steps):
                rows = mode_batches[(r * args.steps + s) % len(mode_batches)]
                times, tokens_computed = step_times(model, optimizer, lambda rows=rows: makers[mode](rows))
                parts = {k: parts.get(k, 0.0) + v for k, v in times.items()}
                computed += tokens_computed
            rounds[mode].append((args.steps * BATCH / sum(parts.values()), parts, computed))
    summary = report(rounds, args, tokens, full)
    print(json.dumps(summary))
    return summary


def report(rounds: dict, args: argparse.Namespace, tokens: dict, full: list) -> dict:
    """Print the table (median round per mode) and return the JSON summary."""
    print(f"{'mode':<11} {'images/s':>8} {'vs fixed':>8} {'tokens/step':>11} {'real':>6}   ms per step: "
          f"{'batch':>6} {'forward':>8} {'backward':>8} {'optim':>6}   meet E")
    median = {mode: sorted(values, key=lambda v: v[0])[len(values) // 2] for mode, values in rounds.items()}
    base = median["fixed256"][0]
    real = PROMPT + 2 + sum(len(t) for t in tokens["adaptive"]) / len(tokens["adaptive"])
    summary = {"images": len(tokens["adaptive"]), "threads": args.threads, "batch": BATCH,
               "halt_threshold": args.halt_threshold, "rule": tokens["rule"],
               "mean_image_tokens": round(real - PROMPT - 2, 2), "modes": {}}
    for mode, (speed, parts, computed) in median.items():
        per_step = computed / args.steps
        share = tokens["fixed_share"] if mode == "fixed256" else tokens["adaptive_share"]
        useful = (PROMPT + 2 + tokens_max(tokens)) * BATCH if mode == "fixed256" else real * BATCH
        print(f"{mode:<11} {speed:8.2f} {speed / base:7.2f}x {per_step:11.0f} {useful / per_step:6.0%}   "
              f"{'':>13}{1000 * parts['batch'] / args.steps:6.0f} {1000 * parts['forward'] / args.steps:8.0f} "
              f"{1000 * parts['backward'] / args.steps:8.0f} {1000 * parts['optimizer'] / args.steps:6.0f}   "
              f"{share:.1%}")
        summary["modes"][mode] = {"images_per_s": round(speed, 3), "vs_fixed256": round(speed / base, 3),
                                  "tokens_per_step": round(per_step), "share_meeting_target": round(share, 4),
                                  "ms_per_step": {k: round(1000 * v / args.steps, 1) for k, v in parts.items()},
                                  "all_rounds_images_per_s": [round(v[0], 3) for v in rounds[mode]]}
    return summary


def tokens_max(tokens: dict) -> int:
    return len(tokens["fixed"][0])


if __name__ == "__main__":
    main()
