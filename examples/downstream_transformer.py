"""Variable-length image tokens as input to a small downstream transformer (text + image vocabulary).

    python examples/downstream_transformer.py IMAGE [IMAGE ...] [--model MODEL] [--halt-threshold 0.06]
    python examples/downstream_transformer.py --tokens TOKENIZED_DIR [--steps 3]

Without ``--model`` it uses the default model embedded in the package; the model must have quantized latents.

Each image is encoded adaptively (its own length), then every row becomes
``[text prompt] <boi> [image ids] <eoi> <pad> ...`` in one combined vocabulary: text ids ``[0, 1000)``, image
ids at ``1000 + id``, then ``<boi>``, ``<eoi>``, ``<pad>``. A tiny causal ``nn.TransformerEncoder`` runs one
forward pass with a key-padding mask, and a next-token loss ignores the padding.

With ``--tokens`` it reads a folder written by ``adaptive-tokenizer tokenize`` through ``TokenDataset`` (rows read
from the Parquet shards as needed) and ``collate_tokens`` (``<boi> [1000 + id] <eoi> <pad> ...``, attention mask,
lengths), and trains the transformer for a few steps.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from torch import Tensor, nn

from adaptive_tokenizer import AdaptiveTokenizer
from adaptive_tokenizer.token_dataset import TokenDataset, collate_tokens

TEXT_VOCAB = 1000


class TinyLM(nn.Module):
    """Token + position embeddings, a few transformer layers, a next-token head."""

    def __init__(self, vocab_size: int, max_len: int, width: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.randn(max_len, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, ids: Tensor, padding: Tensor) -> Tensor:
        """``ids`` ``[N, S]``, ``padding`` ``[N, S]`` True on padding -> logits ``[N, S, vocab]``."""
        x = self.embed(ids) + self.position[: ids.shape[1]]
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).triu(1)  # True = may not attend
        return self.head(self.transformer(x, mask=causal, src_key_padding_mask=padding, is_causal=True))


def build_sequences(image_ids: Tensor, image_mask: Tensor, prompt: Tensor, boi: int, eoi: int,
                    pad: int) -> tuple[Tensor, Tensor]:
    """``[prompt] <boi> [image ids + TEXT_VOCAB] <eoi>``, right-padded -> ``(ids [N, S], padding [N, S])``."""
    n, longest = image_ids.shape
    start = len(prompt) + 1  # first image position
    ids = torch.full((n, start + longest + 1), pad, dtype=torch.long)
    ids[:, : len(prompt)] = prompt
    ids[:, len(prompt)] = boi
    ids[:, start : start + longest] = torch.where(image_mask, image_ids + TEXT_VOCAB, pad)
    lengths = image_mask.sum(dim=1)
    ids[torch.arange(n), start + lengths] = eoi  # right after each image's last real token
    return ids, ids == pad


def train_on_tokenized(directory: str, steps: int, batch_size: int = 8) -> None:
    """A few training steps of TinyLM on ``<boi> image ids <eoi>`` rows of a tokenized folder."""
    data = TokenDataset(directory)
    if not data.config.quantized:
        raise SystemExit("this example needs token ids; the folder holds continuous vectors")
    boi, eoi, pad = (TEXT_VOCAB + data.config.codebook_size + i for i in range(3))
    collate = partial(collate_tokens, offset=TEXT_VOCAB, begin_id=boi, end_id=eoi, pad_id=pad)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = TinyLM(vocab_size=pad + 1, max_len=data.config.max_tokens + 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    print(f"{len(data)} tokenized images in {directory}")
    batches = iter(loader)
    for step in range(steps):
        batch = next(batches, None)
        if batch is None:  # another epoch
            batches = iter(loader)
            batch = next(batches)
        ids, padding = batch["input_ids"], ~batch["attention_mask"]
        logits = model(ids, padding)
        targets = ids[:, 1:].masked_fill(padding[:, 1:], -100)
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}: batch {tuple(ids.shape)}, lengths {batch['lengths'].tolist()}, loss {loss.item():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*")
    parser.add_argument("--model", default=None, help="default: the embedded default model")
    parser.add_argument("--halt-threshold", type=float, default=0.06)
    parser.add_argument("--tokens", metavar="DIR", help="train on a folder written by `adaptive-tokenizer tokenize`")
    parser.add_argument("--steps", type=int, default=3, help="training steps with --tokens (default: 3)")
    args = parser.parse_args()
    if args.tokens:
        train_on_tokenized(args.tokens, args.steps)
        return
    if not args.images:
        parser.error("give images to encode, or --tokens DIR")

    tok = AdaptiveTokenizer.from_pretrained(args.model)
    if not tok.config.quantized:
        parser.error("this example needs a quantized model (token ids); continuous models give vectors")
    result = tok.encode(args.images, halt_threshold=args.halt_threshold)
    print(f"tokens per image: {result.num_tokens.tolist()}")

    image_ids, image_mask = result.padded(pad_id=0)  # [N, Lmax] ids, [N, Lmax] True on real tokens
    boi, eoi, pad = (TEXT_VOCAB + tok.config.codebook_size + i for i in range(3))
    prompt = torch.randint(0, TEXT_VOCAB, (5,))  # stand-in for a tokenized caption
    ids, padding = build_sequences(image_ids, image_mask, prompt, boi, eoi, pad)
    print(f"padded image ids {tuple(image_ids.shape)}, sequences {tuple(ids.shape)}, "
          f"real tokens per row {(~padding).sum(dim=1).tolist()}")

    torch.manual_seed(0)
    model = TinyLM(vocab_size=pad + 1, max_len=ids.shape[1]).eval()
    with torch.no_grad():
        logits = model(ids, padding)
        targets = ids[:, 1:].masked_fill(padding[:, 1:], -100)  # no loss on padding
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    print(f"vocab {pad + 1} (text {TEXT_VOCAB} + image {tok.config.codebook_size} + <boi>/<eoi>/<pad>), "
          f"logits {tuple(logits.shape)}, next-token loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
