"""The training recipe (``training/``) on tiny models and tiny random images: finite, decreasing losses on a fixed
batch, exact resume, exports that the library loads and encodes with."""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from adaptive_tokenizer import AdaptiveTokenizer
from adaptive_tokenizer.config import ModelConfig, VQGANConfig
from adaptive_tokenizer.hub import MANIFEST_PATH
from adaptive_tokenizer.metrics import grey
from training import alit_init, distill, evaluate, vq
from training.ship import ship
from training.data import list_images, random_crop, split_files
from training.losses import ms_ssim


@pytest.fixture(autouse=True)
def one_thread():
    """The recipe runs with --threads 1 here; restore the caller's thread count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(12):
        h, w = int(rng.integers(36, 56)), int(rng.integers(36, 56))
        # smooth random images (a blurry gradient + noise), like photos more than white noise
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(xx / (3 + c + i % 4)) + np.cos(yy / (4 + c)) for c in range(3)], -1)
        array = ((base - base.min()) / (np.ptp(base) + 1e-6) * 200 + rng.integers(0, 55, (h, w, 3))).astype(np.uint8)
        Image.fromarray(array).save(folder / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
    return folder


VQ_ARGS = ["--resolution", "32", "--size", "16", "--full-size-frac", "0.5", "--ch", "32", "--ch-mult", "1,1,1",
           "--num-res-blocks", "1", "--codebook-dim", "16", "--codebook-size", "64", "--batch-size", "4",
           "--threads", "1", "--no-progress", "--cache-side", "40", "--warmup", "2", "--seed", "3",
           "--restart-every", "2", "--dead-threshold", "0.5", "--ema-decay", "0.5", "--steps", "4"]


def tiny_config(base_config) -> ModelConfig:
    return ModelConfig(base=base_config, image_size=32, patch_size=4, encoder_width=64, encoder_layers=1,
                       encoder_heads=2, decoder_width=64, decoder_layers=1, decoder_heads=2, token_dim=4,
                       codebook_size=32, tokens_per_iteration=4, max_iterations=3, decoder_max_latent_tokens=12,
                       dynamic_halting=False, rollout="cached")


def test_split_and_crops(image_folder):
    names = list_images(image_folder)
    train, val = split_files(names, 0.1)
    assert len(val) == 2 and len(train) == 10 and not set(train) & set(val)
    assert sorted(split_files(list(reversed(names)), 0.1)[1]) == sorted(val)  # depends on names only
    crop = random_crop(torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8), 16, 32, 0.6, random.Random(0))
    assert crop.shape == (3, 16, 16) and 0 <= crop.min() and crop.max() <= 1
    # --grey-fraction: that share of crops in greyscale (luma in every channel); 0 draws nothing, so runs resume as before
    colour = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    assert torch.equal(random_crop(colour, 16, 32, 0.6, random.Random(0), grey_fraction=0.0),
                       random_crop(colour, 16, 32, 0.6, random.Random(0)))
    greyed = random_crop(colour, 16, 32, 0.6, random.Random(0), grey_fraction=1.0)
    assert torch.equal(greyed[0], greyed[1]) and torch.equal(greyed[1], greyed[2])
    assert torch.allclose(greyed[0], grey(random_crop(colour, 16, 32, 0.6, random.Random(0))[None])[0, 0])
    shares = [bool(random_crop(colour, 8, 32, 0.6, random.Random(seed), grey_fraction=0.25).std(0).max() == 0)
              for seed in range(400)]
    assert 0.18 < sum(shares) / 400 < 0.32
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(ms_ssim(x, x), torch.ones(2)) and (ms_ssim(x, torch.rand_like(x)) < 0.5).all()


def test_vq_step_decreases_loss():
    torch.manual_seed(0)
    args = vq.build_parser().parse_args(["--data", "x", "--out", "x", *VQ_ARGS, "--precision", "fp32"])
    config = vq.VQGANConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=16, codebook_size=64,
                            codebook_dim=16, resolution=32)
    model = vq.VQGAN(config)
    model.codebook.requires_grad_(False)
    ema = vq.EMACodebook(64, 16, 0.9, 0.5, torch.device("cpu"))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    pixels = torch.rand(4, 3, 32, 32)
    losses = []
    for _ in range(8):
        loss, parts, flat, ids = vq.vq_step(model, ema, pixels, args, torch.device("cpu"))
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(flat, ids, model.codebook.data)
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def refused(main, argv, capsys) -> str:
    """``main(argv)`` refuses to train: exit code 2 (a command line that does not fit the run); its message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


def _run_vq(folder, out, stop_after=None):
    extra = ["--stop-after", str(stop_after)] if stop_after else []
    return vq.main(["--data", str(folder), "--out", str(out), *VQ_ARGS, *extra])


def test_vq_resume_and_export(image_folder, tmp_path, capsys):
    _run_vq(image_folder, tmp_path / "a", stop_after=2)
    _run_vq(image_folder, tmp_path / "a")  # resumes at step 2 (crosses the 16 -> 32 px switch and a restart)
    _run_vq(image_folder, tmp_path / "b")
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in "ab")
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    base = vq.load_base(tmp_path / "a" / "export")
    torch.testing.assert_close(base.codebook, a["model"]["codebook"])
    provenance = json.loads((tmp_path / "a" / "provenance.json").read_text())
    assert a["ema"]["restarts"] > 0
    assert len(provenance["sessions"]) == 2 and provenance["data"]["num_files"] == 12
    assert provenance["totals"]["steps"] == 4
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["val_l1"]) for m in metrics)
    vq.main(["--data", str(image_folder), "--out", str(tmp_path / "c"), *VQ_ARGS, "--stop-after", "0",
             "--init", str(tmp_path / "a" / "export")])
    c = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=False)
    for key in a["model"]:
        torch.testing.assert_close(c["model"][key], a["model"][key], rtol=0, atol=0, msg=key)
    # --norm-groups and --shortcut (the default model's 8 and "input" by default) are part of the exported
    # architecture; a run is never continued with other values, from its checkpoint or from --init
    assert (base.config.norm_groups, base.config.shortcut) == (8, "input")
    args = ["--data", str(image_folder), *VQ_ARGS, "--stop-after", "0"]
    vq.main(args + ["--out", str(tmp_path / "g32"), "--norm-groups", "32", "--shortcut", "branch"])  # the authors'
    exported = vq.load_base(tmp_path / "g32" / "export").config
    assert (exported.norm_groups, exported.shortcut) == (32, "branch")
    assert "--norm-groups 32" in refused(vq.main, args + ["--out", str(tmp_path / "g32"), "--shortcut", "branch"],
                                         capsys)
    assert "--shortcut branch" in refused(vq.main, args + ["--out", str(tmp_path / "g32"), "--norm-groups", "32"],
                                          capsys)
    assert "same architecture" in refused(vq.main, args + ["--out", str(tmp_path / "d"), "--init",
                                                           str(tmp_path / "g32" / "export")], capsys)


def _distill_arguments(image_folder, tmp_path) -> list[str]:
    """A 2-step base tokenizer and a tiny ALIT config under ``tmp_path``: the arguments every stage-2/3 test shares."""
    _run_vq(image_folder, tmp_path / "vq", stop_after=2)
    config_path = tmp_path / "tiny.json"
    tiny_config(vq.load_base(tmp_path / "vq" / "export").config).to_json(config_path)
    return ["--data", str(image_folder), "--base", str(tmp_path / "vq" / "export"), "--config", str(config_path),
            "--batch-size", "4", "--threads", "1", "--no-progress", "--cache-side", "40", "--seed", "5"]


def test_distill(image_folder, tmp_path, capsys):
    common = _distill_arguments(image_folder, tmp_path) + ["--warmup", "2", "--restart-every", "2",
                                                          "--dead-threshold", "0.3", "--iters-per-step", "2"]
    base = vq.load_base(tmp_path / "vq" / "export")

    # loss decreases on a fixed batch
    args = distill.build_parser().parse_args(common + ["--out", "x", "--precision", "fp32"])
    torch.manual_seed(0)
    model = distill.ALITModel(tiny_config(base.config))
    alit_init.init_alit_weights(model, 0)
    model.base.load_state_dict(base.state_dict())
    model.base.requires_grad_(False)
    quantizer = distill.QuantizerTrainer(32, dead_threshold=0.3)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    pixels = torch.rand(4, 3, 32, 32)
    losses = []
    for _ in range(6):
        loss, parts, _ = distill.distill_step(model, quantizer, pixels, args, torch.device("cpu"), [0, 2])
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model.base.encoder.conv_in.weight.grad is None  # base frozen
    args.pixel_weight = 1.0  # stage 3 option: pixel loss through the base decoder
    loss, parts, _ = distill.distill_step(model, quantizer, pixels, args, torch.device("cpu"), [1])
    loss.backward()
    assert torch.isfinite(loss) and "pl1_1" in parts and model.decoder.head[0].weight.grad is not None
    assert model.base.decoder.conv_in.weight.grad is None  # the base decoder stays frozen without the flag

    # --ce-weight scales the cross-entropy term alone (default 1: the paper's loss)
    assert args.ce_weight == 1.0
    with torch.no_grad():
        full, parts, _ = distill.distill_step(model, quantizer, pixels, args, torch.device("cpu"), [0])
        args.ce_weight = 0.25
        scaled, _, _ = distill.distill_step(model, quantizer, pixels, args, torch.device("cpu"), [0])
    assert (full - scaled).item() == pytest.approx(0.75 * parts["ce"], rel=1e-4)

    # stage 3 with --train-base-decoder: the base decoder learns (also from the base's own codes), its encoder and
    # codebook stay as they are; the flag without a pixel loss is refused
    with pytest.raises(SystemExit):
        distill.main(common + ["--out", str(tmp_path / "s3"), "--train-base-decoder"])
    with pytest.raises(SystemExit):  # loss weights are >= 0
        distill.main(common + ["--out", str(tmp_path / "s3"), "--ce-weight", "-0.5"])
    stage3 = common + ["--out", str(tmp_path / "s3"), "--steps", "2", "--pixel-weight", "1", "--train-base-decoder"]
    before = vq.load_base(tmp_path / "vq" / "export").state_dict()
    distill.main(stage3)
    after = AdaptiveTokenizer.from_pretrained(tmp_path / "s3" / "export").model.base.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and all(key.startswith("decoder.") for key in changed)
    resumed_without = stage3[: stage3.index("--train-base-decoder")]
    assert "with --train-base-decoder" in refused(distill.main, resumed_without, capsys)
    # a resumed run uses the group settings it is given now, not those stored with the optimizer state
    distill.main(stage3[: stage3.index("--steps")] + ["--steps", "3"] + stage3[stage3.index("--steps") + 2 :]
                 + ["--base-decoder-lr-scale", "0.7"])
    resumed = torch.load(tmp_path / "s3" / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == 3 and resumed["optimizer"]["param_groups"][-1]["lr_scale"] == 0.7
    args = distill.build_parser().parse_args(stage3)
    assert args.iteration_weights == distill.ITERATION_WEIGHTS  # the authors' weights unless told otherwise
    assert distill.build_parser().parse_args(stage3 + ["--iteration-weights", "1,2"]).iteration_weights == (1.0, 2.0)
    for bad in ("1,x", "1,0"):
        with pytest.raises(SystemExit):
            distill.build_parser().parse_args(stage3 + ["--iteration-weights", bad])
    _, parts, _ = distill.distill_step(model, quantizer, pixels, args, torch.device("cpu"), [0])
    assert "base_l1" in parts

    # resume reproduces an uninterrupted run; the export loads and encodes
    distill.main(common + ["--out", str(tmp_path / "a"), "--steps", "4", "--stop-after", "2"])
    distill.main(common + ["--out", str(tmp_path / "a"), "--steps", "4"])
    distill.main(common + ["--out", str(tmp_path / "b"), "--steps", "4"])
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in "ab")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    for folder in ("export", "export-fp16"):
        tok = AdaptiveTokenizer.from_pretrained(tmp_path / "a" / folder)
        result = tok.encode(torch.rand(2, 3, 32, 32), budget=8)
        assert [len(t) for t in result.tokens] == [8, 8]
        assert tok.decode(result).shape == (2, 3, 32, 32)
    metrics = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"val_l1_4", "val_l1_12", "val_l1_base"} <= set(metrics)
    # the public-API evaluation agrees with the training-time validation on the held-out files
    result = evaluate.main(["--model", str(tmp_path / "a" / "export"), "--data", str(image_folder),
                            "--split", str(tmp_path / "a" / "split.json")])
    assert result["l1_12"] == pytest.approx(metrics["val_l1_12"], abs=1e-4)
    assert result["sharp_12"] == pytest.approx(metrics["val_sharp_12"], abs=1e-3)
    assert result["l1_base"] == pytest.approx(metrics["val_l1_base"], abs=1e-4)
    assert (tmp_path / "a" / "export" / "training_provenance.json").is_file()

    # continuing from exported (e.g. committed fp16) weights in a fresh run folder
    distill.main(common + ["--out", str(tmp_path / "c"), "--steps", "1", "--stop-after", "0",
                           "--init", str(tmp_path / "a" / "export-fp16")])
    # (its encoder/decoder/quantizer from --init, its frozen base from --base, which may have trained further)
    c = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=False)
    base_weights = base.state_dict()
    for key in a["model"]:
        expected = base_weights[key[5:]] if key.startswith("base.") else a["model"][key].half().float()
        torch.testing.assert_close(c["model"][key], expected, rtol=0, atol=0, msg=key)
    # ... and its provenance continues that of the weights it started from, with the base's record
    history = json.loads((tmp_path / "a" / "provenance.json").read_text())
    record = json.loads((tmp_path / "c" / "provenance.json").read_text())
    assert record["sessions"][:-1] == history["sessions"] and len(record["sessions"]) == 3
    assert record["base"]["stage"] == "vq" and record["base"]["sessions"]
    assert record["totals"]["images_seen"] == history["totals"]["images_seen"]
    # ... also onto a base of another architecture (here other GroupNorm groups and shortcut): a warm start
    vq.main(["--data", str(image_folder), "--out", str(tmp_path / "vq32"), *VQ_ARGS, "--stop-after", "1",
             "--norm-groups", "32", "--shortcut", "branch"])
    new_base = vq.load_base(tmp_path / "vq32" / "export")
    other = common[:]
    other[other.index("--base") + 1] = str(tmp_path / "vq32" / "export")
    distill.main(other + ["--out", str(tmp_path / "d"), "--steps", "1", "--stop-after", "0",
                          "--init", str(tmp_path / "a" / "export")])
    d = torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=False)
    for key, value in d["model"].items():
        expected = new_base.state_dict()[key[5:]] if key.startswith("base.") else a["model"][key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
    wider = tmp_path / "wider.json"  # but never into another ALIT architecture
    tiny_config(base.config).replace(encoder_width=32).to_json(wider)
    other[other.index("--config") + 1] = str(wider)
    wider_init = other + ["--out", str(tmp_path / "e"), "--init", str(tmp_path / "a" / "export")]
    assert "its ALIT config differs" in refused(distill.main, wider_init, capsys)
    # ... or into a deeper one: the added blocks start as the identity, so the grown model is the same function
    config = tiny_config(base.config)
    deeper = config.replace(encoder_layers=config.encoder_layers + 1, decoder_layers=config.decoder_layers + 2)
    deeper.to_json(tmp_path / "deeper.json")
    grown_args = common[:]
    grown_args[grown_args.index("--config") + 1] = str(tmp_path / "deeper.json")
    distill.main(grown_args + ["--out", str(tmp_path / "f"), "--steps", "1", "--stop-after", "0",
                               "--init", str(tmp_path / "a" / "export")])
    grown = distill.ALITModel(deeper)
    grown.load_state_dict(torch.load(tmp_path / "f" / "checkpoint.pt", weights_only=False)["model"])
    original = AdaptiveTokenizer.from_pretrained(tmp_path / "a" / "export")
    images = torch.rand(3, 3, 32, 32)
    grown_tok = AdaptiveTokenizer(grown)
    expected, result = original.encode(images, budget=12), grown_tok.encode(images, budget=12)
    assert all(torch.equal(a_, b_) for a_, b_ in zip(expected.tokens, result.tokens))
    torch.testing.assert_close(grown_tok.decode(result), original.decode(expected), rtol=0, atol=0)
    # ... never into a shallower one
    grown_tok.save_pretrained(tmp_path / "grown")
    shallower = common + ["--out", str(tmp_path / "g"), "--init", str(tmp_path / "grown")]
    assert "only more encoder/decoder layers" in refused(distill.main, shallower, capsys)


def test_init_schemes():
    config = tiny_config(VQGANConfig(resolution=32, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=8,
                                     codebook_size=16, codebook_dim=8))
    small, sincos = distill.ALITModel(config), distill.ALITModel(config)
    alit_init.init_alit_weights(small, 0, "small")
    alit_init.init_alit_weights(sincos, 0, "xavier-sincos")
    width = config.encoder_width
    codes = alit_init.sincos_2d(config.grid_size, width)
    assert codes.shape == (config.grid_size**2, width) and len({tuple(row.tolist()) for row in codes}) == len(codes)
    for part in ("encoder", "decoder"):
        torch.testing.assert_close(getattr(sincos, part).positional_embedding[1:], codes * width**-0.5)
        assert getattr(small, part).positional_embedding.abs().max() <= 0.04  # trunc-normal(0.02)
    assert sincos.encoder.transformer.blocks[0].attn.qkv.weight.std() > 2 * small.encoder.transformer.blocks[
        0].attn.qkv.weight.std()  # xavier vs 0.02
    with pytest.raises(ValueError, match="unknown init scheme 'kaiming'"):
        alit_init.init_alit_weights(small, 0, "kaiming")


def test_ship_embeds_fp16_weights_and_registers_them(converted_dirs, tmp_path):
    package = tmp_path / "package"
    copies = (package / "weights_manifest.json", tmp_path / "weights_manifest.json")
    package.mkdir()
    for copy in copies:
        copy.write_text(MANIFEST_PATH.read_text())
    entry = ship(converted_dirs["A"], "tiny-test", description="tiny", license="other", training_data="fixtures",
                 recipe="adaptive-tokenizer convert", default=True, package_dir=package,
                 manifest_copies=copies)
    assert copies[0].read_text() == copies[1].read_text()
    manifest = json.loads(copies[0].read_text())
    assert manifest["default"] == "tiny-test" and manifest["models"]["tiny-test"] == entry
    weights = load_file(package / "weights" / "tiny-test" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}
    assert (package / "weights" / "tiny-test" / "README.md").is_file()
    tok = AdaptiveTokenizer.from_pretrained(manifest=copies[0])  # the default, checksums verified
    assert len(tok.encode(torch.rand(3, 64, 64), budget=32).tokens[0]) == 32


def test_latent_grid_positions_cover_the_grid_coarse_to_fine():
    cells = alit_init.latent_grid_positions(16, 32, 8)
    assert cells.shape == (8, 32) and sorted(cells.flatten().tolist()) == list(range(256))
    rows, cols = cells[0] // 16, cells[0] % 16
    assert set(rows.tolist()) == {0, 4, 8, 12} and set(cols.tolist()) == set(range(0, 16, 2))  # 4x8 sub-grid


def _layer0_attention(part, x: torch.Tensor) -> torch.Tensor:
    """Attention probabilities ``[N, heads, L, L]`` of the first block of ``part`` (encoder or decoder) on ``x``."""
    block = part.transformer.blocks[0]
    q, k, _ = block.attn.qkv(block.norm1(x)).chunk(3, dim=-1)
    q, k = (t.unflatten(-1, (block.attn.heads, -1)).transpose(1, 2) for t in (q, k))
    return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)


def test_local_init_routes_attention_by_position():
    """``--init-scheme local``: at step 0 an encoder latent attends around its own grid cell and a decoder grid
    query attends to the latent of its cell (random images; the base tokenizer is untrained here)."""
    from adaptive_tokenizer.presets import DEFAULT_MODEL

    config, grid = DEFAULT_MODEL, DEFAULT_MODEL.grid_size
    cells = alit_init.latent_grid_positions(grid, config.tokens_per_iteration, config.max_iterations)
    pixels = torch.rand(2, 3, config.image_size, config.image_size)
    features = torch.randn(2, config.base.z_channels, grid, grid)
    neighbourhood = {}
    for scheme in ("xavier-sincos", "local"):
        model = distill.ALITModel(config)
        alit_init.init_alit_weights(model, 0, scheme)
        with torch.no_grad():
            prefix = model.encoder.embed_image(pixels, features)
            x = model.encoder.norm_pre(torch.cat([prefix, model.encoder.latent_block(0).expand(2, -1, -1)], 1))
            to_grid = _layer0_attention(model.encoder, x)[:, :, prefix.shape[1]:, 1 : prefix.shape[1]]
            to_grid = to_grid.reshape(2, -1, config.tokens_per_iteration, grid, grid)
            mass = [to_grid[:, :, i, max(0, r - 1) : r + 2, max(0, c - 1) : c + 2].sum((-1, -2)).mean()
                    for i, (r, c) in enumerate(zip((cells[0] // grid).tolist(), (cells[0] % grid).tolist()))]
            neighbourhood[scheme] = torch.stack(mass).mean().item()
            vectors = F.normalize(torch.randn(2, cells.numel(), config.token_dim), dim=-1)
            latents = model.decoder.norm_pre(model.decoder.latent_embed(vectors)
                                             + model.decoder.latent_positional_embedding[: cells.numel()])
            x = torch.cat([model.decoder.normed_queries().expand(2, -1, -1), latents], 1)
            to_latents = _layer0_attention(model.decoder, x)[:, :, 1 : 1 + grid**2, 1 + grid**2 :]
            latent_of_cell = torch.empty(grid**2, dtype=torch.long)
            latent_of_cell[cells.flatten()] = torch.arange(cells.numel())
            own = to_latents.gather(-1, latent_of_cell.view(1, 1, -1, 1).expand(2, to_latents.shape[1], -1, 1))
        if scheme == "local":
            assert own.mean() > 20 / cells.numel()  # uniform would be 1 / 256
    assert neighbourhood["local"] > 0.3 > 0.1 > neighbourhood["xavier-sincos"]  # 3x3 cells: uniform 9 / 256


def test_codebook_initialised_from_the_first_batch():
    config = tiny_config(VQGANConfig(resolution=32, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=8,
                                     codebook_size=16, codebook_dim=8))
    model = distill.ALITModel(config)
    alit_init.init_alit_weights(model, 0)
    vectors = torch.randn(4, 12, config.token_dim)
    quantizer = distill.QuantizerTrainer(config.codebook_size, init_from_data=True)
    _, ids, _, normalised = quantizer(model, vectors, 0.25)
    similarity = F.normalize(model.quantizer.codebook, dim=-1) @ normalised.reshape(-1, config.token_dim).t()
    assert similarity.max(1).values.min() > 0.99  # every code sits on one of the batch's vectors
    assert not quantizer.needs_init and not quantizer.state_dict()["needs_init"]
    assert ids.unique().numel() > config.codebook_size // 2


def test_provenance_totals_across_run_folders(tmp_path):
    """Steps, hours and images add up over every session, also when a fresh run folder continues exported weights
    (its steps count from 0 again)."""
    from training.common import Provenance
    exported = tmp_path / "export"
    exported.mkdir()
    earlier = [{"start_step": 0, "end_step": 5, "wall_seconds": 10.0, "images_seen": 40},
               {"start_step": 5, "end_step": 8, "wall_seconds": 6.0, "images_seen": 24}]
    (exported / "training_provenance.json").write_text(json.dumps({"stage": "distill", "sessions": earlier}))
    args = argparse.Namespace(seed=0, argv=["--init", str(exported)])
    record = Provenance(tmp_path / "run", "distill", args, {"num_files": 1}, inherit=exported)
    (tmp_path / "run").mkdir()
    record.update(start_step=0, end_step=4, wall_seconds=2.0, images_seen=32)
    totals = json.loads((tmp_path / "run" / "provenance.json").read_text())["totals"]
    assert totals == {"steps": 12, "wall_seconds": 18.0, "images_seen": 96}


def test_stopping_rules(converted_dirs, images_u8, tmp_path, capsys):
    """``python -m training.stopping_rules``: each rule's threshold is the one whose mean length is closest to the
    target; the constrained search keeps the mean length and reaches the Spearman it is asked for."""
    from training import stopping_rules
    quantity = np.array([[0.5, 0.3, 0.2, 0.1], [0.4, 0.35, 0.3, 0.25], [0.9, 0.8, 0.7, 0.6]])
    assert stopping_rules.rule_lengths(quantity, 1).tolist() == [0, 0, 0]
    # threshold 0.5: images 0 and 1 meet it at once, image 2 never does and takes its lowest (the last): mean 2
    assert stopping_rules.rule_lengths(quantity, 2).tolist() == [0, 0, 3]
    assert stopping_rules.rule_lengths(quantity, 3).tolist() == [1, 2, 3]  # threshold 0.3: mean exactly 3
    generator = np.random.default_rng(0)
    l1 = np.sort(generator.random((8, 4)), axis=1)[:, ::-1] + np.arange(8)[:, None] * 0.1
    complexity = np.arange(8.0)
    chosen = stopping_rules.constrained_search(l1, complexity, 2, restarts=2, moves=3000)
    assert (chosen + 1).mean() == 2 and stopping_rules.spearman(chosen, complexity) >= 0.6
    # the floor-weight sweep: w = 0 is the plain rule; the selection is the highest Spearman (then the smallest w)
    # among the weights whose mean L1 beats the fixed budget's
    errors = np.sort(generator.random((8, 4)), axis=1)[:, ::-1].copy()
    base_errors = generator.random((8, 1)) * 0.5
    rows, selected = stopping_rules.floor_weight_sweep(errors, errors, base_errors, complexity, 2)
    assert len(rows) == 101 and rows[0]["weight"] == 0.0 and rows[-1]["weight"] == 1.0
    plain = stopping_rules.rule_lengths(errors, 2)
    assert rows[0]["mean_l1"] == errors[np.arange(8), plain].mean()
    beating = [row for row in rows if row["mean_l1"] < errors[:, 1].mean()]
    assert beating and selected == max(beating, key=lambda row: (row["spearman"], -row["weight"]))["weight"]
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, image in enumerate(images_u8):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index}.png")
    tok = AdaptiveTokenizer.from_pretrained(converted_dirs["A"])
    stopping_rules.main([str(folder), "--model", str(converted_dirs["A"]),
                         "--target-tokens", str(2 * tok.tokens_per_iteration), "--floor-weights"])
    out = capsys.readouterr().out
    assert "| 0.50 |" in out and "selected length_floor_weight:" in out
    assert "3 images" in out and all(f"| {rule} |" in out for rule in ("l1_input", "l1_base", "entropy", "best"))


def test_sharpness_and_colour_losses():
    from training.losses import (PatchDiscriminator, adaptive_weight, colour_loss, generator_loss,
                                 gradient_energy_loss, hinge_discriminator_loss)

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=gen)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    shifted = torch.roll(x, shifts=1, dims=3)  # the same texture, other pixels
    assert gradient_energy_loss(x, x).item() == pytest.approx(0, abs=1e-6)
    # asks for the input's texture energy, not for its pixels: a shifted copy costs far less than a blur
    assert gradient_energy_loss(shifted, x) < 0.2 * gradient_energy_loss(blurred, x)
    grey = x.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    cast = grey + torch.tensor([0.02, 0.0, -0.02]).view(1, 3, 1, 1)
    assert colour_loss(grey, grey).item() == 0 and colour_loss(cast, grey).item() > 0.02
    recon = grey.clone().requires_grad_(True)
    colour_loss(recon.expand(-1, 3, -1, -1) + torch.tensor([0.02, 0.0, -0.02]).view(1, 3, 1, 1), grey).backward()
    assert recon.grad.abs().sum() > 0

    disc = PatchDiscriminator(channels=8, layers=2, groups=4)
    logits = disc(x)
    assert logits.shape == (2, 1, 6, 6)  # one logit per overlapping patch
    assert hinge_discriminator_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0  # confident, right
    assert hinge_discriminator_loss(torch.zeros(4), torch.zeros(4)).item() == 1
    # taming's adaptive weight: the ratio of the two gradient norms at the last layer
    layer = torch.nn.Conv2d(3, 3, 1)
    out = layer(x)
    rec, adv = out.abs().mean(), 3 * generator_loss(out)
    w = adaptive_weight(rec, adv, layer.weight)
    g_rec = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0].norm()
    g_adv = torch.autograd.grad(adv, layer.weight, retain_graph=True)[0].norm()
    assert w.item() == pytest.approx((g_rec / (g_adv + 1e-4)).item(), rel=1e-5) and not w.requires_grad


def test_distill_adversarial_stage3(image_folder, tmp_path):
    from training.losses import PatchDiscriminator
    from training.stage3 import Adversary

    common = _distill_arguments(image_folder, tmp_path) + ["--warmup", "1", "--pixel-weight", "1", "--grad-weight",
                                                          "1", "--colour-weight", "1"]
    with pytest.raises(SystemExit):  # the adaptive weight is measured at the base decoder's output layer
        distill.main(common + ["--out", str(tmp_path / "x"), "--disc-weight", "0.5"])
    gan = common + ["--train-base-decoder", "--disc-weight", "0.5", "--disc-start", "1", "--disc-channels", "8",
                    "--disc-layers", "2", "--log-every", "1"]
    distill.main(gan + ["--out", str(tmp_path / "a"), "--steps", "2", "--stop-after", "1"])
    first = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    fresh = PatchDiscriminator(8, 2).state_dict()
    assert any(not torch.equal(first["adversary"]["discriminator"][k], fresh[k]) for k in fresh)  # it learned
    distill.main(gan + ["--out", str(tmp_path / "a"), "--steps", "2"])  # resumed, discriminator included
    distill.main(gan + ["--out", str(tmp_path / "b"), "--steps", "2"])
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in "ab")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    for key in a["adversary"]["discriminator"]:
        torch.testing.assert_close(a["adversary"]["discriminator"][key], b["adversary"]["discriminator"][key],
                                   rtol=0, atol=0, msg=key)
    metrics = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"d_loss", "g_loss", "d_weight", "grad", "colour"} <= set(metrics)
    # --disc-ramp scales the generator term's weight (the same step at ramp 1 and 0.25)
    args = distill.build_parser().parse_args(gan + ["--out", "x", "--precision", "fp32"])
    model = AdaptiveTokenizer.from_pretrained(tmp_path / "a" / "export").model.float()
    model.base.decoder.requires_grad_(True)
    adversary = Adversary(args, torch.device("cpu"))
    adversary.generator_on = True
    pixels = torch.rand(4, 3, 32, 32)
    weights = []
    for ramp in (1.0, 0.25):
        adversary.ramp = ramp
        quantizer = distill.QuantizerTrainer(32, dead_threshold=0.3)
        _, parts, _ = distill.distill_step(model, quantizer, pixels, args, torch.device("cpu"), [0, 2],
                                           adversary=adversary)
        weights.append(parts["d_weight"])
    assert weights[1] == pytest.approx(0.25 * weights[0], rel=1e-4) and len(adversary.fakes) == 6
    assert {"val_sharp_4", "val_sharp_12", "val_offset_base"} <= set(metrics)
    # continued in a fresh folder from the compact files of a model that has a length predictor: the predictor
    # is not carried over (it is fitted after training, adaptive-tokenizer fit-length-predictor)
    from adaptive_tokenizer.config import LengthPredictorConfig
    from adaptive_tokenizer.fit_length_predictor import with_predictor
    from adaptive_tokenizer.length_predictor import LengthPredictor

    init = tmp_path / "init"
    exported = AdaptiveTokenizer.from_pretrained(tmp_path / "a" / "export-fp16")
    head = LengthPredictor(exported.config.replace(
        length_predictor=LengthPredictorConfig(features=("pixels",), hidden=4, num_inputs=11)))
    AdaptiveTokenizer(with_predictor(exported.model, head)).save_pretrained(init)
    distill.main(gan + ["--out", str(tmp_path / "c"), "--steps", "1", "--stop-after", "0", "--init", str(init),
                        "--init-discriminator", str(tmp_path / "a" / "discriminator.safetensors")])
    c = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=False)
    for key, value in c["adversary"]["discriminator"].items():
        torch.testing.assert_close(value, a["adversary"]["discriminator"][key].half().float(), rtol=0, atol=0)
    assert AdaptiveTokenizer.from_pretrained(tmp_path / "c" / "export").config.length_predictor is None


def test_strips(converted_dirs, tmp_path):
    from training import strips

    grey = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40), dtype=np.uint8)).convert("RGB")
    grey.save(tmp_path / "grey.png")
    strips.main([str(tmp_path / "grey.png"), "--model", str(converted_dirs["A"]), "--name", "m", "--budgets", "32,64",
                 "-o", str(tmp_path / "s.png")])
    sheet = Image.open(tmp_path / "s.png")
    assert sheet.width == 3 * 256 and sheet.height > 256  # input + 2 budgets, one row, labels below
