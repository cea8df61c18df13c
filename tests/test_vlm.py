"""``adaptive_tokenizer.vlm``: image tokens in a ``transformers`` text tokenizer, the processor that expands
``<image>`` placeholders into each image's own length, packed batches whose logits equal each row's run alone, and
images decoded back from generated ids.

Everything offline: a word-level text tokenizer built in code, a 2-layer ``LlamaForCausalLM`` from a config, the
small random image tokenizer of the rollout tests (8 tokens per iteration, 32 codes).
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from adaptive_tokenizer.vlm import (AdaptiveTokenizerProcessor, ImageSpanLogitsProcessor, pack_rows,  # noqa: E402
                                    length_grouped_sampler)

from .test_length_rules import tokenizer as image_tokenizer  # noqa: E402
from .tolerances import network_atol  # noqa: E402

WORDS = ["<unk>", "<pad>", "<s>", "a", "photo", "of", "describe", "this", "picture", "and", "then"]


def text_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   padding_side=padding_side)


@pytest.fixture(scope="module")
def tok():
    return image_tokenizer("cached", False, predictor=True)


@pytest.fixture(scope="module")
def photos():
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(2)),
                                             size=64, mode="bilinear")
    return torch.cat([smooth, torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))]).clamp(0, 1)


@pytest.fixture(scope="module")
def target(tok, photos):
    """A target the two photos reach at different lengths (the smooth one sooner)."""
    _, errors = tok.reconstructions(photos)
    return float((errors[0, 0] + errors[1, -1]) / 2) if errors[0, 0] < errors[1, -1] else float(errors[0, 1])


def processor_for(tok, padding_side: str = "right") -> AdaptiveTokenizerProcessor:
    return AdaptiveTokenizerProcessor.add_image_tokens(text_tokenizer(padding_side), tok)


def llama(vocab_size: int, attention: str) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         attn_implementation=attention)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


# ---- the id mapping ------------------------------------------------------------------------------------------
def test_image_tokens_are_consecutive_special_tokens_after_the_text_vocabulary(tok):
    processor = processor_for(tok)
    text = processor.tokenizer
    assert len(text) == len(WORDS) + 3 + 32
    assert (processor.boi_id, processor.eoi_id, processor.placeholder_id) == (11, 12, 13)
    assert processor.image_id_offset == 14
    assert text.convert_ids_to_tokens([14, 45]) == ["<img_0>", "<img_31>"]
    codes = torch.arange(32)
    assert torch.equal(processor.text_ids_to_image_ids(processor.image_ids_to_text_ids(codes)), codes)
    with pytest.raises(ValueError, match=r"outside the image range \[14, 46\)"):
        processor.text_ids_to_image_ids(torch.tensor([13]))
    with pytest.raises(ValueError, match="already has image tokens"):
        AdaptiveTokenizerProcessor.add_image_tokens(text, tok)
    with pytest.raises(ValueError, match="has no image tokens.*add_image_tokens"):
        AdaptiveTokenizerProcessor(tok, text_tokenizer())


# ---- the processor ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
def test_each_placeholder_becomes_its_image_at_its_own_length(tok, photos, target, side):
    processor = processor_for(tok, side)
    encoded = tok.encode(photos, halt_threshold=target)
    assert encoded.num_tokens[0] != encoded.num_tokens[1]  # two lengths
    batch = processor(text=["describe <image> and then <image>", "a photo"], images=photos, halt_threshold=target,
                      return_tensors="pt")
    assert batch["image_num_tokens"].tolist() == encoded.num_tokens.tolist()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n0, n1 = encoded.num_tokens.tolist()
    span = lambda i: [processor.boi_id, *(encoded.tokens[i] + processor.image_id_offset).tolist(), processor.eoi_id]
    words = lambda *w: processor.tokenizer.convert_tokens_to_ids(list(w))
    expected = [words("describe") + span(0) + words("and", "then") + span(1), words("a", "photo")]
    assert ids.shape == (2, len(expected[0])) and mask.sum(dim=1).tolist() == [len(e) for e in expected]
    short = ids[1][mask[1].bool()].tolist()
    assert ids[0].tolist() == expected[0] and short == expected[1]
    pad_at = slice(len(expected[1]), None) if side == "right" else slice(0, len(expected[0]) - len(expected[1]))
    assert set(ids[1][pad_at].tolist()) == {processor.tokenizer.pad_token_id}
    assert len(expected[0]) == 1 + n0 + 2 + 2 + n1 + 2


def test_images_without_text_and_tokens_already_made(tok, photos, target, tmp_path):
    """No text: one ``<boi> ids <eoi>`` row per image. ``image_tokens=`` takes an ``EncodeResult``, ``TokenDataset``
    rows or id tensors, with the same result as encoding the images."""
    processor = processor_for(tok)
    from_images = processor(images=photos, halt_threshold=target, return_tensors="pt")
    encoded = tok.encode(photos, halt_threshold=target)
    rows = [{"key": f"{i}", "tokens": t, "num_tokens": len(t)} for i, t in enumerate(encoded.tokens)]
    for given in (encoded, rows, list(encoded.tokens)):
        again = processor(image_tokens=given, return_tensors="pt")
        assert torch.equal(again["input_ids"], from_images["input_ids"])
    assert from_images["input_ids"][0, 0] == processor.boi_id
    with pytest.raises(ValueError, match="ids must lie in"):
        processor(image_tokens=[torch.tensor([40] * 8)])
    with pytest.raises(ValueError, match="has 5 tokens"):
        processor(image_tokens=[torch.zeros(5, dtype=torch.long)])


@pytest.mark.parametrize("text,count,message", [
    ("a photo of <image>", 2, r"1 <image> placeholders \(row 0: 1\) but 2 images"),
    (["<image> <image>", "<image>"], 2, r"3 <image> placeholders \(row 0: 2, row 1: 1\) but 2 images"),
    ("a photo", 1, r"0 <image> placeholders \(row 0: 0\) but 1 images"),
])
def test_placeholders_and_images_must_match(tok, photos, text, count, message):
    processor = processor_for(tok)
    with pytest.raises(ValueError, match=message):
        processor(text=text, images=photos[:count], budget=16)


def test_encode_options_and_defaults(tok, photos):
    processor = AdaptiveTokenizerProcessor.add_image_tokens(text_tokenizer(), tok, encode_defaults={"max_tokens": 16})
    assert processor(images=photos)["image_num_tokens"] == [16, 16]
    assert processor(images=photos, budget=8)["image_num_tokens"] == [8, 8]
    with pytest.raises(ValueError, match="budget is an alias of max_tokens"):
        processor(images=photos, budget=8, max_tokens=16)
    with pytest.raises(ValueError, match="give images or image_tokens, not both"):
        processor(images=photos, image_tokens=[torch.zeros(8, dtype=torch.long)])
    with pytest.raises(ValueError, match="unknown encode defaults"):
        AdaptiveTokenizerProcessor(tok, processor.tokenizer, encode_defaults={"budgt": 8})


# ---- ids -> images ---------------------------------------------------------------------------------------------
def test_decode_images_gives_the_image_tokenizers_pixels(tok, photos, target):
    processor = processor_for(tok)
    batch = processor(text=["a <image> and <image>", "<image> photo"], images=torch.cat([photos, photos[:1]]),
                      halt_threshold=target, return_tensors="pt")
    encoded = tok.encode(torch.cat([photos, photos[:1]]), halt_threshold=target)
    decoded = processor.decode_images(batch["input_ids"])
    assert [len(d) for d in decoded] == [2, 1]
    expected = tok.decode(encoded)
    assert torch.equal(torch.cat(decoded), expected)  # bit-identical: the same decode of the same codes
    assert torch.equal(processor.decode_images(batch["input_ids"][0]), tok.decode(encoded.tokens[:2]))
    assert processor.decode_images(torch.tensor([3, 4])).shape == (0, 3, 64, 64)
    assert processor.batch_decode(batch["input_ids"], skip_special_tokens=True)[0] == "a and"


def test_decode_images_names_what_is_wrong(tok):
    processor = processor_for(tok)
    boi, eoi, offset = processor.boi_id, processor.eoi_id, processor.image_id_offset
    eight = [offset + i for i in range(8)]
    cut = [3, boi, *eight, eoi, 4, boi, *eight[:5]]
    with pytest.raises(ValueError, match=r"sequence 0, position 12: the image span has no <eoi> \(cut off\?\)"):
        processor.decode_images(torch.tensor(cut))
    assert processor.decode_images(torch.tensor(cut), incomplete="drop").shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="sequence 1, position 0: the image span has 7 image tokens; this image "
                                         "tokenizer decodes 8 to 32 in multiples of 8"):
        processor.decode_images([[3], [boi, *eight[:7], eoi]])
    with pytest.raises(ValueError, match=r"sequence 0, position 3: id 4 inside the image span opened at position 0 "
                                         r"is not an image token \(image ids are \[14, 46\)\)"):
        processor.decode_images([boi, *eight[:2], 4, eoi])
    with pytest.raises(ValueError, match="position 1: id 11 inside the image span"):
        processor.decode_images([boi, boi, *eight, eoi])
    with pytest.raises(ValueError, match="position 2: <eoi> without a <boi>"):
        processor.decode_images([3, 4, eoi])
    with pytest.raises(ValueError, match="incomplete must be"):
        processor.decode_images([3], incomplete="skip")


# ---- saving and loading ----------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tok, photos, target, tmp_path):
    processor = AdaptiveTokenizerProcessor.add_image_tokens(text_tokenizer(), tok,
                                                            encode_defaults={"halt_threshold": target})
    processor.save_pretrained(tmp_path / "processor")
    config = json.loads((tmp_path / "processor" / "processor_config.json").read_text())
    assert config["image_tokens"]["image_id_offset"] == processor.image_id_offset
    assert config["image_tokenizer"]["saved"] == "image_tokenizer"  # built in memory: saved with it
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    loaded = AdaptiveTokenizerProcessor.from_pretrained(tmp_path / "processor")
    text = ["describe <image> and <image>"]
    assert torch.equal(loaded(text=text, images=photos, return_tensors="pt")["input_ids"],
                       processor(text=text, images=photos, return_tensors="pt")["input_ids"])
    assert loaded.encode_defaults == {"halt_threshold": target}
    other = image_tokenizer("recurrent", False, predictor=False)
    with pytest.raises(ValueError, match="not the ones this processor was saved with"):
        AdaptiveTokenizerProcessor.from_pretrained(tmp_path / "processor", image_tokenizer=other)
    with pytest.raises(FileNotFoundError, match="processor_config.json"):
        AdaptiveTokenizerProcessor.from_pretrained(tmp_path)


def test_a_processor_records_the_image_tokenizer_by_name(tmp_path, tok):
    """An image tokenizer loaded by name (here a folder) is recorded by that name, not copied."""
    from adaptive_tokenizer import AdaptiveTokenizer

    tok.save_pretrained(tmp_path / "model")
    named = AdaptiveTokenizer.from_pretrained(tmp_path / "model")
    AdaptiveTokenizerProcessor.add_image_tokens(text_tokenizer(), named).save_pretrained(tmp_path / "p")
    config = json.loads((tmp_path / "p" / "processor_config.json").read_text())
    assert config["image_tokenizer"]["name_or_path"] == str(tmp_path / "model")
    assert not (tmp_path / "p" / "image_tokenizer").exists()
    assert AdaptiveTokenizerProcessor.from_pretrained(tmp_path / "p").image_tokenizer.name_or_path == str(
        tmp_path / "model")


# ---- packed batches --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_each_rows_logits(tok, photos, target, attention):
    """The issue's end-to-end check: the processor's two rows (two photos of different adaptive lengths) packed into
    one row give, under ``model(**packed)``, the logits of the two unpacked forwards; the photos come back from the
    ids equal to ``tok.decode``."""
    processor = processor_for(tok)
    batch = processor(text=["describe <image>", "a photo of <image> and"], images=photos, halt_threshold=target,
                      padding=False)
    rows = [torch.tensor(r) for r in batch["input_ids"]]
    model = llama(len(processor.tokenizer), attention)
    packed, layout = pack_rows(rows, capacity=sum(len(r) for r in rows) + 3)
    assert packed["input_ids"].shape == (1, sum(len(r) for r in rows) + 3)
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
        alone = [model(input_ids=r[None]).logits[0] for r in rows]
    assert torch.isfinite(logits).all()
    for got, expected in zip(layout.unpack(logits), alone):
        torch.testing.assert_close(got, expected, rtol=0,
                                   atol=network_atol([model], scale=expected.abs().max()))
    pixels = processor.decode_images([r.tolist() for r in rows])
    assert torch.equal(torch.cat(pixels), tok.decode(tok.encode(photos, halt_threshold=target)))


def test_pack_rows_layout_labels_and_limits():
    rows = [torch.arange(1, 6), torch.arange(10, 13), torch.arange(20, 27), torch.arange(30, 32)]
    batch, layout = pack_rows(rows, capacity=8, pad_id=0)
    # first fit by decreasing length: 7 | 5 + 3 | 2 (rows may move; within a row the input order is kept)
    assert batch["input_ids"].tolist() == [[20, 21, 22, 23, 24, 25, 26, 0], [1, 2, 3, 4, 5, 10, 11, 12],
                                           [30, 31, 0, 0, 0, 0, 0, 0]]
    assert layout.row.tolist() == [1, 1, 0, 2] and layout.start.tolist() == [0, 5, 0, 0]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert batch["labels"][1].tolist() == [-100, 2, 3, 4, 5, -100, 11, 12]
    assert batch["labels"][2].tolist() == [-100, 31] + [-100] * 6
    mask = batch["attention_mask"]
    assert mask.shape == (3, 1, 8, 8) and mask.dtype == torch.float32
    assert (mask[1, 0, 5, :5] == float("-inf")).all() and (mask[1, 0, 7, 5:8] == 0).all()  # no look across
    assert (mask[2, 0, 4].isinf().sum() == 7) and mask[2, 0, 4, 4] == 0  # padding sees itself only
    assert [t.tolist() for t in layout.unpack(batch["input_ids"])] == [r.tolist() for r in rows]
    with pytest.raises(ValueError, match="row 2 has 7 tokens, more than capacity 6"):
        pack_rows(rows, capacity=6)
    with pytest.raises(ValueError, match="row 0: expected a 1-D tensor of ids"):
        pack_rows([torch.zeros(2, 2, dtype=torch.long)], capacity=8)


def test_length_grouped_batches_hold_similar_lengths():
    lengths = [8 * (1 + i % 32) for i in range(640)]
    sampler = length_grouped_sampler(lengths, 16, generator=torch.Generator().manual_seed(0))
    order = list(sampler)
    assert sorted(order) == list(range(640))
    batches = [[lengths[i] for i in order[s : s + 16]] for s in range(0, 640, 16)]
    padded = sum(16 * max(b) for b in batches)
    assert padded < 1.3 * sum(lengths)  # random batches of these lengths pad to ~1.8x


# ---- generation ------------------------------------------------------------------------------------------------
def test_constrained_generation_makes_a_span_that_decodes(tok):
    processor = processor_for(tok)
    model = llama(len(processor.tokenizer), "sdpa")
    prompt = torch.tensor([processor.tokenizer.convert_tokens_to_ids(["a", "photo"]) + [processor.boi_id]])
    out = model.generate(prompt, max_new_tokens=40, do_sample=False,
                         logits_processor=[ImageSpanLogitsProcessor(processor)], pad_token_id=0)
    generated = out[0, prompt.shape[1]:].tolist()
    end = generated.index(processor.eoi_id)  # closed, at the latest after the longest length
    assert end in (8, 16, 24, 32)
    assert all(processor.image_id_offset <= t < processor.image_id_offset + 32 for t in generated[:end])
    assert len(processor.decode_images(out[0], incomplete="drop")) >= 1


def test_the_core_package_does_not_import_transformers():
    import subprocess
    import sys

    code = "import adaptive_tokenizer, adaptive_tokenizer.cli, sys; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
