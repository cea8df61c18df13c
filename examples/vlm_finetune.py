"""Adaptive image tokens in a Hugging Face ``transformers`` causal LM, end to end, offline.

    pip install "adaptive-tokenizer[vlm]"
    python examples/vlm_finetune.py [PHOTO ...] [--steps 300] [--halt-threshold 0.0629] [--out generated.png]
    python examples/vlm_finetune.py --tokens TOKENIZED_DIR [--steps 300]      # a folder `tokenize` wrote

1. A text tokenizer made here: a byte-level BPE trained with ``tokenizers`` on the captions below (no download).
2. ``AdaptiveTokenizerProcessor.add_image_tokens`` gives it ``<boi>``, ``<eoi>``, ``<image>`` and one token per
   codebook entry; a small ``LlamaForCausalLM`` (random init, from a config) is resized to the new vocabulary.
3. The photos (default: ``evaluation/photos``) are tokenized adaptively (the verified rule at ``--halt-threshold``),
   each becoming ``"a photo of NAME: <boi> ids <eoi>"`` of its own length. With ``--tokens`` the rows come from a
   folder written by ``adaptive-tokenizer tokenize`` instead (``TokenDataset``; ``--model`` must be the model that
   wrote it: its weights' sha256 is checked).
4. A few hundred training steps on packed rows (``pack_rows``: several rows per ``--capacity`` tokens, the 4-D
   block-diagonal mask and restarting positions, so no compute goes to padding).
5. Generation from ``"a photo of NAME: <boi>"``, greedy, constrained by ``ImageSpanLogitsProcessor`` so that it forms
   a span the image tokenizer can decode, and ``processor.decode_images`` back to pixels: the first photo and its
   generated copy are written side by side to ``--out``.

It will not make good pictures (a tiny model, a few photos, minutes of CPU): it shows the whole path and how to wire
it. Scale the model, the data and the steps for real use.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from adaptive_tokenizer import AdaptiveTokenizer
from adaptive_tokenizer.image_io import labelled_strip, list_image_files, to_pil
from adaptive_tokenizer.serialization import model_identity
from adaptive_tokenizer.vlm import AdaptiveTokenizerProcessor, ImageSpanLogitsProcessor, pack_rows

CAPTIONS = """a photo of a cat on a sofa
a photo of a dog in the grass
a photo of a brick wall
a photo of gravel on a path
a photo of a coffee cup on a table
a photo of an astronaut
a photo of a street at night
a photo of trees in the fog
describe the picture in one sentence
what is in this photo
""".splitlines()


def train_text_tokenizer(texts: list[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, wrapped for ``transformers``."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", nargs="*", help="image files (default: evaluation/photos)")
    parser.add_argument("--tokens", default=None, help="train on a tokenized folder instead of photos")
    parser.add_argument("--model", default=None, help="the image tokenizer (default: the embedded default model)")
    parser.add_argument("--halt-threshold", type=float, default=0.0629,
                        help="target error of each photo's tokens (0.0629: about 128 tokens on photos)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--capacity", type=int, default=512, help="tokens per packed row")
    parser.add_argument("--width", type=int, default=128, help="the language model's hidden size")
    parser.add_argument("--out", default="generated.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    image_tokenizer = AdaptiveTokenizer.from_pretrained(args.model)
    if args.tokens:
        from adaptive_tokenizer.token_dataset import TokenDataset

        dataset = TokenDataset(args.tokens)
        if dataset.settings["model"]["weights_sha256"] != model_identity(image_tokenizer.model)[0]["weights_sha256"]:
            parser.error(f"{args.tokens} was tokenized by another model than --model {args.model or '(default)'}")
        samples = [dataset[i] for i in range(len(dataset))]
        names = [Path(sample["key"]).stem for sample in samples]
    else:
        photos = args.photos or [str(p) for p in list_image_files("evaluation/photos")]
        names = [Path(p).stem for p in photos]

    text_tokenizer = train_text_tokenizer(CAPTIONS + [f"a photo of {name}" for name in names])
    config = LlamaConfig(vocab_size=len(text_tokenizer), hidden_size=args.width, intermediate_size=2 * args.width,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=args.capacity, pad_token_id=text_tokenizer.pad_token_id,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config)  # a text model ...

    processor = AdaptiveTokenizerProcessor.add_image_tokens(text_tokenizer, image_tokenizer)
    model.resize_token_embeddings(len(text_tokenizer))  # ... that now reads and writes image tokens too
    print(f"vocabulary: {len(text_tokenizer)} ids; image code c is id {processor.image_id_offset} + c")

    prompts = [f"a photo of {name}: <image>" for name in names]
    if args.tokens:
        batch = processor(text=prompts, image_tokens=samples, padding=False)
    else:
        batch = processor(text=prompts, images=photos, halt_threshold=args.halt_threshold, padding=False)
    rows = [torch.tensor(ids) for ids in batch["input_ids"]]
    print(f"{len(rows)} rows; image tokens per photo: {batch['image_num_tokens']} "
          f"(mean {sum(batch['image_num_tokens']) / len(rows):.0f})")

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(args.steps):
        chosen = random.sample(rows, k=min(len(rows), 8))
        packed, _ = pack_rows(chosen, capacity=max(args.capacity, max(len(r) for r in chosen)))
        loss = model(**packed).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  packed {tuple(packed['input_ids'].shape)}")

    model.eval()
    prompt = text_tokenizer(f"a photo of {names[0]}:", return_tensors="pt")["input_ids"]
    prompt = torch.cat([prompt, torch.tensor([[processor.boi_id]])], dim=1)
    longest = image_tokenizer.max_tokens + 1
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=longest, do_sample=False, pad_token_id=text_tokenizer.pad_token_id,
                             logits_processor=[ImageSpanLogitsProcessor(processor)])
    generated = processor.decode_images(out[0])  # [1, 3, R, R]: the span the model closed
    original = processor.decode_images(rows[0])  # the first row's image, as the model saw it
    strip = labelled_strip([to_pil(original[0]), to_pil(generated[0])],
                           [f"{names[0]}: tokenized", f"generated, {out.shape[1] - prompt.shape[1] - 1} tokens"])
    strip.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
