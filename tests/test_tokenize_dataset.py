"""``adaptive-tokenizer tokenize`` / ``tokenize_dataset``: Parquet shards equal to ``tok.encode``, failures listed,
resuming after SIGKILL, refusing mixed settings, other sources, and reading back with ``TokenDataset``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from adaptive_tokenizer.cli import main  # noqa: E402
from adaptive_tokenizer.token_dataset import TokenDataset, collate_tokens  # noqa: E402
from adaptive_tokenizer.tokenize_dataset import tokenize_dataset  # noqa: E402

ROOT = Path(__file__).parent.parent
PHOTOS = sorted((ROOT / "evaluation" / "photos").glob("*.png"))
BROKEN = {"a/not_an_image.png": "cannot identify image file", "b/c/truncated.jpg": "truncated",
          "empty.jpg": "cannot identify image file"}


def make_folder(folder: Path, count: int) -> list[str]:
    """``count`` small crops of the evaluation photos in nested folders (PNG and JPEG), the ``BROKEN`` files and
    a text file; returns the readable images' keys (paths relative to ``folder``), sorted."""
    keys = []
    for index in range(count):
        with Image.open(PHOTOS[index % len(PHOTOS)]) as photo:
            photo = photo.convert("RGB")
            side = min(photo.size) // 2
            left, top = (index * 37) % (photo.width - side), (index * 53) % (photo.height - side)
            crop = photo.crop((left, top, left + side, top + side + index * 3)).resize((96 + index * 8, 112))
        key = ["", "a/", "b/", "b/c/"][index % 4] + f"img{index:02d}." + ("png" if index % 3 else "jpg")
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        crop.save(folder / key)
        keys.append(key)
    (folder / "a" / "not_an_image.png").write_text("this is text")
    (folder / "b" / "c" / "truncated.jpg").write_bytes((folder / keys[0]).read_bytes()[:300])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not listed: not an image suffix")
    return sorted(keys)


def read_rows(directory: Path) -> list[dict]:
    files = sorted(directory.glob("part-*.parquet"))
    return [row for path in files for row in pq.read_table(path).to_pylist()]


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("part-*.parquet"))}


def run_cli(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("photos")
    return folder, make_folder(folder, 14)


@pytest.fixture(scope="module")
def budget_run(converted_dirs, photo_dir, tmp_path_factory) -> Path:
    """The reference: the CLI at budget 64, shards of 4 inputs, batches of 3."""
    out = tmp_path_factory.mktemp("tokens") / "budget64"
    code = main(["tokenize", str(photo_dir[0]), str(out), "--model", str(converted_dirs["A"]), "--budget", "64",
                 "--shard-size", "4", "--batch-size", "3"])
    assert code == 3  # completed, but the broken files were skipped
    return out


# ---- output equals tok.encode --------------------------------------------------------------------------------
def test_budget_rows_equal_encode_of_each_path(budget_run, photo_dir, tok_a):
    folder, keys = photo_dir
    rows = read_rows(budget_run)
    assert [row["key"] for row in rows] == keys  # one row per readable image, source order, none twice
    assert len(list(budget_run.glob("part-*.parquet"))) == 5  # 17 inputs (14 + 3 broken) in shards of 4
    expected = tok_a.encode([str(folder / key) for key in keys], budget=64)
    for row, tokens in zip(rows, expected.tokens):
        assert row["num_tokens"] == 64 and row["tokens"] == tokens.tolist()
        assert "error" not in row
    all_keys = sorted(keys + list(BROKEN))
    assert [row["index"] for row in rows] == [all_keys.index(key) for key in keys]


def test_broken_files_are_listed_with_reasons(budget_run):
    failures = [json.loads(line) for line in (budget_run / "errors.jsonl").read_text().splitlines()]
    assert [f["key"] for f in failures] == sorted(BROKEN)
    for failure in failures:
        assert BROKEN[failure["key"]] in failure["reason"]


def test_index_and_shard_metadata_record_the_job(budget_run, converted_dirs, tok_a):
    from adaptive_tokenizer import __version__
    from adaptive_tokenizer.token_shards import shard_info

    index = json.loads((budget_run / "index.json").read_text())
    settings = index["settings"]
    assert index["complete"] and index["num_shards"] == 5
    assert index["totals"] == {"inputs": 17, "rows": 14, "failed": 3, "tokens": 14 * 64}
    assert settings["encode"] == {"max_tokens": 64}
    assert settings["library_version"] == __version__ and settings["shard_size"] == 4
    assert settings["model"]["config"] == json.loads(tok_a.config.to_json_string())
    assert len(settings["model"]["weights_sha256"]) == 64
    assert settings["source"]["kind"] == "folder" and settings["source"]["num_inputs"] == 17
    assert index["model_name"] == str(converted_dirs["A"])  # the --model argument: recorded, not compared
    info = shard_info(budget_run / "part-00000.parquet")
    assert info["settings"] == settings and info["shard"] == 0 and info["model_name"] == index["model_name"]
    # The same weights loaded another way continue the job (nothing left to do here).
    again = tokenize_dataset(index["source_description"], budget_run, model=tok_a, encode_kwargs={"budget": 64},
                             shard_size=4)
    assert again.shards_reused == 5 and again.shards_written == 0


def test_summary_line_and_exit_status(converted_dirs, photo_dir, budget_run, tmp_path, capsys):
    code, out, err = run_cli(capsys, "tokenize", photo_dir[0], budget_run, "--model", converted_dirs["A"],
                             "--budget", "64", "--shard-size", "4")
    assert code == 3  # finished job: nothing to do, still 3 failures
    assert "tokenized 14 of 17 images (3 failed), 896 tokens, mean 64.0 per image" in out
    assert "5 shards from an earlier run" in out and "errors.jsonl" in err
    # A folder without broken files exits 0.
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "one.png").write_bytes((photo_dir[0] / photo_dir[1][0]).read_bytes())
    code, out, _ = run_cli(capsys, "tokenize", clean, tmp_path / "out", "--model", converted_dirs["A"], "--budget", "32")
    assert code == 0 and "tokenized 1 of 1 images (0 failed)" in out


def test_adaptive_rows_equal_encode(converted_dirs, photo_dir, tok_a, tmp_path):
    folder, keys = photo_dir
    keys = keys[:4]
    listing = tmp_path / "list.txt"
    listing.write_text("# four photos\n" + "".join(f"{folder / key}\n" for key in keys) + "\n")
    summary = tokenize_dataset(listing, tmp_path / "out", model=converted_dirs["A"], shard_size=4, batch_size=4,
                               encode_kwargs={"max_tokens": 64, "halt_threshold": 0.44})
    assert summary.exit_status == 0 and summary.num_tokenized == 4
    rows = read_rows(tmp_path / "out")
    assert [row["key"] for row in rows] == [str(folder / key) for key in keys]  # list keys: as listed
    expected = tok_a.encode([str(folder / key) for key in keys], max_tokens=64, halt_threshold=0.44)
    assert [row["num_tokens"] for row in rows] == expected.num_tokens.tolist()
    assert len(set(expected.num_tokens.tolist())) > 1  # the threshold picks different lengths
    for row, tokens, error in zip(rows, expected.tokens, expected.errors):
        assert row["tokens"] == tokens.tolist()
        assert row["error"] == pytest.approx(float(error), abs=1e-6)  # measured (the exact rule) ...
        assert row["predicted_error"] is None  # ... and no estimate


def test_predicted_rule_rows_equal_encode(photo_dir, tmp_path):
    """With ``length_rule="predicted"`` the rows hold the predictor's estimate and no measured error."""
    from .test_length_rules import tokenizer
    from .tolerances import network_atol

    folder, keys = photo_dir
    tok = tokenizer("cached", False, predictor=True)
    tok.save_pretrained(tmp_path / "model")
    paths = [str(folder / key) for key in keys[:6]]
    threshold = float(tok.predict_errors(paths).median())
    kwargs = {"max_tokens": 32, "halt_threshold": threshold, "length_rule": "predicted"}
    summary = tokenize_dataset(folder, tmp_path / "out", model=tmp_path / "model", shard_size=3, batch_size=2,
                               encode_kwargs=kwargs)
    assert summary.exit_status in (0, 3)
    rows = {row["key"]: row for row in read_rows(tmp_path / "out")}
    expected = tok.encode(paths, **kwargs)
    for key, tokens, estimate in zip(keys[:6], expected.tokens, expected.predicted_errors):
        assert rows[key]["tokens"] == tokens.tolist() and rows[key]["error"] is None
        # the estimate passes through the encoder and the head, batched differently: the tolerance rule
        limit = network_atol([tok.model.base.encoder, tok.model.encoder, tok.model.length_predictor], float(estimate))
        assert rows[key]["predicted_error"] == pytest.approx(float(estimate), abs=limit)


# ---- resuming ------------------------------------------------------------------------------------------------
def test_sigkill_then_rerun_gives_the_same_shards(converted_dirs, photo_dir, budget_run, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "adaptive_tokenizer", "tokenize", str(photo_dir[0]), str(out), "--model",
               str(converted_dirs["A"]), "--budget", "64", "--shard-size", "4", "--batch-size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "part-00001.parquet").exists():  # killed once two shards are complete
            assert process.poll() is None and time.monotonic() < deadline, "tokenize ended before it was killed"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    finished = sorted(p.name for p in out.glob("part-*.parquet"))
    assert 2 <= len(finished) < 5 and not (out / "errors.jsonl").exists()
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 3, rerun.stderr
    assert f"{len(finished)} shards from an earlier run" in rerun.stdout
    assert shard_bytes(out) == shard_bytes(budget_run)  # same rows, no key missing, none twice
    assert (out / "errors.jsonl").read_bytes() == (budget_run / "errors.jsonl").read_bytes()
    assert not list(out.glob(".*.tmp"))


def test_other_settings_or_model_are_refused(converted_dirs, photo_dir, budget_run, capsys):
    before = shard_bytes(budget_run)
    code, _, err = run_cli(capsys, "tokenize", photo_dir[0], budget_run, "--model", converted_dirs["A"],
                           "--budget", "32", "--shard-size", "4")
    assert code == 2 and "other settings" in err and "encode.max_tokens: 64 before, 32 now" in err
    code, _, err = run_cli(capsys, "tokenize", photo_dir[0], budget_run, "--model", converted_dirs["B"],
                           "--budget", "64", "--shard-size", "4")
    assert code == 2 and "model.weights_sha256" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert shard_bytes(budget_run) == before


def test_usage_errors(converted_dirs, tmp_path, capsys, tok_a):
    code, _, err = run_cli(capsys, "tokenize", tmp_path / "missing", tmp_path / "out")
    assert code == 2 and "no such folder or list file" in err
    code, _, err = run_cli(capsys, "tokenize", tmp_path, tmp_path / "out", "--engine", "spark")
    assert code == 2 and "invalid choice" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "tokenize", tmp_path / "empty", tmp_path / "out")
    assert code == 2 and "no image files" in err
    listing = tmp_path / "twice.txt"
    listing.write_text("a.png\nb.png\na.png\n")
    with pytest.raises(ValueError, match="line 3: 'a.png' is listed twice"):
        tokenize_dataset(listing, tmp_path / "out", model=tok_a)
    with pytest.raises(TypeError, match="unknown encode options \\['max_token'\\]"):
        tokenize_dataset(ROOT / "evaluation" / "photos", tmp_path / "out", model=tok_a, encode_kwargs={"max_token": 1})


# ---- other sources and models ----------------------------------------------------------------------------------
def test_hugging_face_dataset_source(photo_dir, tok_a, tmp_path):
    datasets = pytest.importorskip("datasets")
    folder, keys = photo_dir
    images = [Image.open(folder / key).convert("RGB") for key in keys[:3]]
    dataset = datasets.Dataset.from_dict({"picture": images}, features=datasets.Features({"picture": datasets.Image()}))
    summary = tokenize_dataset(dataset, tmp_path / "out", model=tok_a, image_column="picture",
                               encode_kwargs={"budget": 32}, progress=False)
    assert summary.exit_status == 0
    rows = read_rows(tmp_path / "out")
    assert [row["key"] for row in rows] == ["0", "1", "2"]  # the dataset index
    expected = tok_a.encode(images, budget=32)
    assert [row["tokens"] for row in rows] == [t.tolist() for t in expected.tokens]
    with pytest.raises(ValueError, match="no column 'image'"):
        tokenize_dataset(dataset, tmp_path / "other", model=tok_a)


def test_continuous_model_vectors_round_trip(photo_dir, tok_b, tmp_path):
    folder, keys = photo_dir
    paths = [str(folder / key) for key in keys[:5]]
    (tmp_path / "list.txt").write_text("\n".join(paths))
    tokenize_dataset(tmp_path / "list.txt", tmp_path / "out", model=tok_b, encode_kwargs={"budget": 32}, batch_size=5)
    data = TokenDataset(tmp_path / "out")
    expected = tok_b.encode(paths, budget=32)  # the same batch: bit-identical (float vectors of another batch
    assert len(data) == 5                      # composition may differ by rounding)
    for index in range(5):
        sample = data[index]
        assert sample["key"] == paths[index] and sample["tokens"].dtype == torch.float32
        assert torch.equal(sample["tokens"], expected.tokens[index])  # float32 stored exactly
    batch = collate_tokens([data[0], data[1]])
    assert batch["inputs"].shape == (2, 32, tok_b.config.latent_dim)
    with pytest.raises(ValueError, match="continuous"):
        collate_tokens([data[0]], offset=10)


# ---- reading back --------------------------------------------------------------------------------------------
def test_token_dataset_rows_and_collate(budget_run, tok_a):
    data = TokenDataset(budget_run, cache_row_groups=1)
    rows = read_rows(budget_run)
    assert len(data) == len(rows) == 14 and data.config == tok_a.config
    for index in (13, 0, 7, -1):
        assert data[index]["key"] == rows[index]["key"]
        assert data[index]["tokens"].tolist() == rows[index]["tokens"] and data[index]["tokens"].dtype == torch.int64
    with pytest.raises(IndexError):
        data[14]
    short = {"key": "x", "tokens": torch.tensor([5, 6]), "num_tokens": 2}
    batch = collate_tokens([data[0], short], offset=1000, begin_id=7, end_id=8, pad_id=9)
    assert batch["lengths"].tolist() == [66, 4]
    assert batch["input_ids"][1].tolist()[:5] == [7, 1005, 1006, 8, 9]
    assert batch["input_ids"][0, 1:65].tolist() == [t + 1000 for t in rows[0]["tokens"]]
    assert batch["attention_mask"].sum(1).tolist() == [66, 4]


def test_token_dataset_feeds_a_training_step(budget_run, tok_a):
    data = TokenDataset(budget_run)
    vocab = 10 + tok_a.config.codebook_size + 3
    begin, end, pad = vocab - 3, vocab - 2, vocab - 1
    collate = partial(collate_tokens, offset=10, begin_id=begin, end_id=end, pad_id=pad)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(vocab, 16), nn.Linear(16, vocab))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    batch = next(iter(loader))
    logits = model(batch["input_ids"])
    targets = batch["input_ids"][:, 1:].masked_fill(~batch["attention_mask"][:, 1:], -100)
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    loss.backward()
    optimizer.step()
    assert batch["input_ids"].shape == (4, 66) and torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_token_dataset_refuses_an_unfinished_job(budget_run, tmp_path):
    import shutil

    partial_dir = tmp_path / "partial"
    shutil.copytree(budget_run, partial_dir)
    index = json.loads((partial_dir / "index.json").read_text())
    (partial_dir / "index.json").write_text(json.dumps({**index, "complete": False}))
    (partial_dir / "part-00003.parquet").unlink()
    with pytest.raises(ValueError, match="has not finished; rerun the same command"):
        TokenDataset(partial_dir)
    assert len(TokenDataset(partial_dir, allow_incomplete=True)) == 14 - 3
    with pytest.raises(FileNotFoundError, match="no index.json"):
        TokenDataset(tmp_path)


# ---- Ray engine ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module: 2 CPUs, no dashboard; workers import this checkout's package."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def test_ray_engine_writes_the_same_shards(local_ray, converted_dirs, photo_dir, budget_run, tmp_path):
    summary = tokenize_dataset(photo_dir[0], tmp_path / "ray", model=converted_dirs["A"], engine="ray", workers=2,
                               encode_kwargs={"budget": 64}, shard_size=4, batch_size=5, progress=False)
    assert summary.exit_status == 3 and summary.num_tokenized == 14
    assert shard_bytes(tmp_path / "ray") == shard_bytes(budget_run)
    assert (tmp_path / "ray" / "errors.jsonl").read_bytes() == (budget_run / "errors.jsonl").read_bytes()


def test_ray_dataset_source(local_ray, photo_dir, budget_run, tok_a, tmp_path):
    folder, keys = photo_dir
    items = [{"key": key, "path": str(folder / key)} for key in reversed(keys[:4] + ["empty.jpg"])]
    summary = tokenize_dataset(local_ray.data.from_items(items), tmp_path / "out", model=tok_a, engine="ray",
                               encode_kwargs={"budget": 64}, progress=False)
    assert summary.num_tokenized == 4 and summary.num_failed == 1
    rows, reference = read_rows(tmp_path / "out"), {row["key"]: row for row in read_rows(budget_run)}
    assert [row["key"] for row in rows] == sorted(keys[:4])  # sorted by key
    assert all(row["tokens"] == reference[row["key"]]["tokens"] for row in rows)
    with pytest.raises(ValueError, match="needs engine='ray'"):
        tokenize_dataset(local_ray.data.from_items(items), tmp_path / "x", model=tok_a)


def test_writing_is_atomic(tmp_path, monkeypatch):
    """A shard is written through write_atomic: a failure mid-write leaves no shard file and no temporary."""
    from adaptive_tokenizer import token_shards

    table = token_shards.shard_table([0], ["k"], [torch.tensor([1, 2])], [2], None, None, None)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        token_shards.write_shard(tmp_path, 0, table, [], {})
    assert list(tmp_path.iterdir()) == []
    assert np.array_equal(table["tokens"].to_pylist()[0], [1, 2])


def test_the_effective_length_rule_is_recorded_so_a_resumed_job_never_mixes_rules(photo_dir, tmp_path):
    """With ``halt_threshold`` and no ``length_rule`` the settings record the rule that ran: ``"verified"`` for a
    model with a length predictor, ``"exact"`` (the fallback) without one. A rerun asking for another rule is
    refused by name; shards written before the rule was recorded count as ``"exact"``, the default of their time."""
    from adaptive_tokenizer.token_shards import normalized_settings

    from .test_length_rules import tokenizer

    folder = tmp_path / "photos"
    folder.mkdir()
    for key in photo_dir[1][:3]:
        Image.open(photo_dir[0] / key).save(folder / Path(key).name)
    for predictor, rule in ((True, "verified"), (False, "exact")):
        tok = tokenizer("cached", False, predictor=predictor)
        out = tmp_path / f"tokens_{rule}"
        tokenize_dataset(folder, out, model=tok, encode_kwargs={"halt_threshold": 0.2}, shard_size=2)
        index = json.loads((out / "index.json").read_text())
        assert index["settings"]["encode"] == {"halt_threshold": 0.2, "length_rule": rule}
        with pytest.raises(ValueError, match=f'encode.length_rule: "{rule}" before, "search" now'):
            tokenize_dataset(folder, out, model=tok, encode_kwargs={"halt_threshold": 0.2, "length_rule": "search"},
                             shard_size=2)
        tokenize_dataset(folder, out, model=tok, encode_kwargs={"halt_threshold": 0.2, "length_rule": rule},
                         shard_size=2)  # the same rule named: the same job
    old = {"encode": {"halt_threshold": 0.2, "max_tokens": 64}, "shard_size": 2}
    assert normalized_settings(old)["encode"] == {"halt_threshold": 0.2, "length_rule": "exact", "max_tokens": 64}
    assert normalized_settings({"encode": {"max_tokens": 64}}) == {"encode": {"max_tokens": 64}, "dtype": "float32"}


def test_token_dataset_lists_every_rows_length_from_one_column(budget_run):
    data = TokenDataset(budget_run)
    lengths = data.num_tokens()
    assert lengths.dtype == np.int64 and lengths.tolist() == [data[i]["num_tokens"] for i in range(len(data))]


def test_the_dtype_is_a_setting_so_a_job_never_mixes_float32_and_bfloat16(photo_dir, tmp_path):
    from .test_length_rules import tokenizer

    folder = tmp_path / "photos"
    folder.mkdir()
    for key in photo_dir[1][:2]:
        Image.open(photo_dir[0] / key).save(folder / Path(key).name)
    out = tmp_path / "tokens"
    tokenize_dataset(folder, out, model=tokenizer("cached", False, predictor=False), dtype="bfloat16",
                     encode_kwargs={"budget": 16}, shard_size=1)
    assert json.loads((out / "index.json").read_text())["settings"]["dtype"] == "bfloat16"
    (out / "part-00001.parquet").unlink()  # as if the job had been killed after its first shard
    with pytest.raises(ValueError, match='dtype: "bfloat16" before, "float32" now'):
        tokenize_dataset(folder, out, model=tokenizer("cached", False, predictor=False), encode_kwargs={"budget": 16},
                         shard_size=1)


@pytest.mark.parametrize("what", ["folder", "shard"])
def test_decode_reads_what_tokenize_wrote(converted_dirs, budget_run, tmp_path, capsys, what):
    """``adaptive-tokenizer decode`` takes the output folder of ``tokenize`` or one of its shards: one PNG per row,
    named after its key, equal to ``tok.decode`` of the row's tokens; another model is refused by name."""
    from adaptive_tokenizer import AdaptiveTokenizer

    source = budget_run if what == "folder" else budget_run / "part-00000.parquet"
    out = tmp_path / "pngs"
    code, stdout, _ = run_cli(capsys, "decode", "--model", converted_dirs["A"], source, "-o", out)
    assert code == 0
    rows = TokenDataset(budget_run)
    expected_rows = [rows[i] for i in range(len(rows))] if what == "folder" else read_rows(source.parent)[:4]
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == len(expected_rows) and f"decoded {len(names)} images" in stdout
    tok = AdaptiveTokenizer.from_pretrained(converted_dirs["A"])
    first = rows[0]
    pixels = tok.decode([first["tokens"]])[0]
    from adaptive_tokenizer.image_io import to_pil

    with Image.open(out / (Path(first["key"]).stem + ".png")) as png:  # decoded in a batch: rounding may differ by 1
        difference = np.asarray(png).astype(int) - np.asarray(to_pil(pixels)).astype(int)
        assert np.abs(difference).max() <= 1
    code, _, err = run_cli(capsys, "decode", "--model", converted_dirs["B"], source, "-o", tmp_path / "other")
    assert code == 2 and "tokenized by another model" in err
