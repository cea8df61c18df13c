"""from_pretrained forms, the weights manifest, checksums, save/push and offline behaviour.

Everything Hub-related runs the real ``huggingface_hub`` client against ``tests/hub_server.py`` on 127.0.0.1; no
test can reach the internet (``no_internet``). ``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and the
cache location at import time, so in-process tests patch its ``constants`` (as the environment would have set
them); ``test_environment_variables`` sets the real variables in subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

import adaptive_tokenizer.tokenizer as tokenizer_module
from adaptive_tokenizer import AdaptiveTokenizer, ChecksumError, ModelInfo, ModelNotFoundError, list_pretrained
from adaptive_tokenizer.cli import main
from adaptive_tokenizer.hub import CARD_NAME, CONFIG_NAME, MANIFEST_PATH, PAPER_URL, WEIGHTS_NAME, load_manifest

from .hub_server import HubServer

ROOT = Path(__file__).resolve().parents[1]
REPO = "testorg/tiny"


# ---- fixtures and helpers -------------------------------------------------------------------------------------
def _point_huggingface_hub_at(monkeypatch, endpoint: str) -> None:
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture(autouse=True)
def no_internet(monkeypatch, tmp_path):
    """Every test: an empty cache under tmp_path, telemetry and implicit tokens off, and the Hub endpoint on a closed
    local port (``hub`` re-points it at the test server)."""
    home = tmp_path / "hf_home"
    for key, value in {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_DISABLE_TELEMETRY": "1",
                       "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_TELEMETRY": True,
                       "HF_HUB_DISABLE_IMPLICIT_TOKEN": True}.items():
        monkeypatch.setattr(constants, key, value)
    _point_huggingface_hub_at(monkeypatch, "http://127.0.0.1:9")


@pytest.fixture
def hub(monkeypatch):
    """A local Hub; huggingface_hub pointed at it."""
    server = HubServer().start()
    _point_huggingface_hub_at(monkeypatch, server.url)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny_files(converted_dirs) -> dict[str, bytes]:
    return {name: (converted_dirs["A"] / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}


@pytest.fixture
def tiny_repo(hub, tiny_files) -> dict[str, str]:
    """``testorg/tiny``: an old commit (dynamic halting at 0.25, also tagged ``v0``), then ``main`` (halting off)."""
    config = json.loads(tiny_files[CONFIG_NAME])
    old_config = json.dumps({**config, "dynamic_halting": True, "dynamic_halting_confidence": 0.25}).encode()
    old = hub.add_commit(REPO, {**tiny_files, CONFIG_NAME: old_config})
    hub.repos[REPO].branches["v0"] = old
    return {"old": old, "main": hub.add_commit(REPO, tiny_files)}


def entry_json(files: dict[str, bytes], location: dict, **changes) -> dict:
    """A manifest entry for the tiny model whose files are ``files``."""
    entry = {"description": "tiny test model", "image_size": 256, "tokens": {"min": 32, "max": 256, "step": 32},
             "latent_kind": "quantized", "rollout_kind": "recurrent", "location": location,
             "files": {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                       for name, data in files.items()},
             "license": "mit", "provenance": {"training_data": "none (test fixture)", "recipe": "pytest"}}
    return {**entry, **changes}


def write_manifest(path: Path, models: dict, default: str | None = None) -> Path:
    path.write_text(json.dumps({"format_version": 1, "default": default, "models": models}, indent=2))
    return path


def same_weights(a: AdaptiveTokenizer, b: AdaptiveTokenizer) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- Hub repos -------------------------------------------------------------------------------------------------
def test_download_then_cache_local_files_only_and_offline(hub, tiny_repo, tok_a, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained must never unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    tok = AdaptiveTokenizer.from_pretrained(REPO)
    assert same_weights(tok, tok_a) and not tok.config.dynamic_halting
    gets = hub.paths("GET")
    assert f"/{REPO}/resolve/main/{CONFIG_NAME}" in gets
    assert f"/{REPO}/resolve/{tiny_repo['main']}/{WEIGHTS_NAME}" in gets  # the weights of the commit main resolved to

    hub.stop()
    served = len(hub.requests)
    for kwargs in ({"local_files_only": True}, {}):  # explicit, then the plain cache fallback with the server down
        assert AdaptiveTokenizer.from_pretrained(REPO, **kwargs).config == tok.config
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert same_weights(AdaptiveTokenizer.from_pretrained(REPO), tok_a)
    assert len(hub.requests) == served


def test_revision_is_honoured(hub, tiny_repo):
    old = tiny_repo["old"]
    for name, kwargs in [(f"{REPO}@v0", {}), (f"{REPO}@{old}", {}), (REPO, {"revision": old}),
                         (f"{REPO}@{old}", {"revision": old})]:
        config = AdaptiveTokenizer.from_pretrained(name, **kwargs).config
        assert config.dynamic_halting and config.dynamic_halting_confidence == 0.25, (name, kwargs)
    assert not AdaptiveTokenizer.from_pretrained(REPO, revision="main").config.dynamic_halting
    with pytest.raises(ValueError, match="names revision 'v0' but revision='main'"):
        AdaptiveTokenizer.from_pretrained(f"{REPO}@v0", revision="main")


def test_token_is_sent(hub, tiny_repo):
    AdaptiveTokenizer.from_pretrained(REPO, token="hf_secret")
    assert {headers.get("authorization") for _, _, headers in hub.requests} == {"Bearer hf_secret"}


@pytest.mark.parametrize("name, expected", [
    ("testorg/missing", ["'testorg/missing'", "no such repo", "config.json"]),
    (f"{REPO}@nope", [f"Hub repo {REPO} at revision nope", "no revision 'nope'"]),
    ("testorg/config-only", ["testorg/config-only", "at revision", "no file 'model.safetensors'"]),
])
def test_unknown_repo_revision_or_file(hub, tiny_repo, tiny_files, name, expected):
    hub.add_commit("testorg/config-only", {CONFIG_NAME: tiny_files[CONFIG_NAME]})
    with pytest.raises(ModelNotFoundError) as caught:
        AdaptiveTokenizer.from_pretrained(name)
    for text in expected:
        assert text in str(caught.value)


def test_offline_and_not_cached(hub, tiny_repo, monkeypatch):
    with pytest.raises(ModelNotFoundError) as caught:
        AdaptiveTokenizer.from_pretrained(REPO, local_files_only=True)
    message = str(caught.value)
    assert f"'{REPO}'" in message and "is not cached" in message and "local_files_only=True" in message
    hint = load_manifest().default_hint()  # the shipped manifest's embedded default, or that there is none
    assert hint in message
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="is not cached .* HF_HUB_OFFLINE is set. " + re.escape(hint)):
        AdaptiveTokenizer.from_pretrained(REPO)
    assert hub.requests == []


# ---- the manifest ------------------------------------------------------------------------------------------------
def test_manifest_hub_entry_is_verified_before_loading(hub, tiny_repo, tiny_files, tmp_path, monkeypatch):
    location = {"repo_id": REPO, "revision": tiny_repo["main"]}
    manifest = write_manifest(tmp_path / "manifest.json", {
        "tiny-hub": entry_json(tiny_files, location),
        "tiny-wrong": entry_json({**tiny_files, CONFIG_NAME: b"something else"}, location)})
    tok = AdaptiveTokenizer.from_pretrained("tiny-hub", manifest=manifest)
    assert tok.info.name == "tiny-hub" and tok.info.license == "mit"

    # a wrong manifest hash, or a cached file corrupted on disk: caught before anything is loaded
    expected = hashlib.sha256(b"something else").hexdigest()
    actual = hashlib.sha256(tiny_files[CONFIG_NAME]).hexdigest()
    cached = Path(constants.HF_HUB_CACHE) / "models--testorg--tiny" / "snapshots" / tiny_repo["main"] / WEIGHTS_NAME
    corrupted = bytearray(tiny_files[WEIGHTS_NAME])
    corrupted[-1] ^= 0xFF
    loads = []
    with monkeypatch.context() as patch:
        patch.setattr(tokenizer_module, "load_model_files", lambda directory: loads.append(directory))
        with pytest.raises(ChecksumError, match=f"config.json .* expected sha256 {expected} .* got sha256 {actual}"):
            AdaptiveTokenizer.from_pretrained("tiny-wrong", manifest=manifest)
        cached.resolve().write_bytes(bytes(corrupted))
        with pytest.raises(ChecksumError) as caught:
            AdaptiveTokenizer.from_pretrained("tiny-hub", manifest=manifest)
    assert loads == []
    message = str(caught.value)
    assert "model.safetensors" in message and hashlib.sha256(tiny_files[WEIGHTS_NAME]).hexdigest() in message
    assert hashlib.sha256(corrupted).hexdigest() in message and "Nothing was loaded" in message
    cache_folder = cached.parents[2]
    assert f"delete the cache folder {cache_folder} to download it again" in message
    shutil.rmtree(cache_folder)
    assert AdaptiveTokenizer.from_pretrained("tiny-hub", manifest=manifest).config == tok.config


def test_embedded_default(hub, tiny_files, tmp_path, monkeypatch):
    package = tmp_path / "package"
    (package / "weights" / "tiny").mkdir(parents=True)
    for name, data in tiny_files.items():
        (package / "weights" / "tiny" / name).write_bytes(data)
    entry = entry_json(tiny_files, {"embedded": "weights/tiny"})
    manifest = write_manifest(package / "weights_manifest.json", {"tiny": entry}, default="tiny")

    tok = AdaptiveTokenizer.from_pretrained(manifest=manifest)
    assert tok.info.name == "tiny" and [e.name for e in list_pretrained(manifest)] == ["tiny"]
    assert AdaptiveTokenizer.from_pretrained("tiny", manifest=manifest).config == tok.config
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match=r"is not cached .* embedded default model 'tiny' needs no download: "
                                                 r"AdaptiveTokenizer.from_pretrained\(\) with no argument"):
        AdaptiveTokenizer.from_pretrained(REPO, manifest=manifest)
    assert hub.requests == []

    (package / "weights" / "tiny" / CONFIG_NAME).write_bytes(b"{}")
    with pytest.raises(ChecksumError, match="config.json .* reinstall adaptive-tokenizer"):
        AdaptiveTokenizer.from_pretrained(manifest=manifest)
    (package / "weights" / "tiny" / CONFIG_NAME).unlink()
    with pytest.raises(ModelNotFoundError, match="should be embedded at .*config.json"):
        AdaptiveTokenizer.from_pretrained(manifest=manifest)


def test_manifest_entry_must_match_the_config(tiny_files, tmp_path):
    (tmp_path / "tiny").mkdir()
    for name, data in tiny_files.items():
        (tmp_path / "tiny" / name).write_bytes(data)
    entry = entry_json(tiny_files, {"embedded": "tiny"}, latent_kind="continuous", image_size=128)
    manifest = write_manifest(tmp_path / "manifest.json", {"tiny": entry})
    with pytest.raises(ValueError, match="image_size 128 != config 256; latent_kind continuous != config quantized"):
        AdaptiveTokenizer.from_pretrained("tiny", manifest=manifest)


def test_shipped_manifest_is_valid_and_identical_at_top_level():
    assert (ROOT / "weights_manifest.json").read_bytes() == MANIFEST_PATH.read_bytes()
    manifest = load_manifest()
    assert manifest.default is None or manifest.models[manifest.default].embedded is not None
    if manifest.default is None:
        with pytest.raises(ModelNotFoundError, match="no embedded default model ships with this version"):
            AdaptiveTokenizer.from_pretrained()


_HUB_LOCATION = {"repo_id": "org/name", "revision": "a" * 40}


@pytest.mark.parametrize("change, expected", [
    (lambda m: m["models"]["x"].update(colour="red"), r"models.x: unknown fields \['colour'\]"),
    (lambda m: m["models"]["x"].pop("license"), r"models.x: missing fields \['license'\]"),
    (lambda m: m["models"]["x"]["provenance"].pop("recipe"), r"models.x.provenance: missing fields \['recipe'\]"),
    (lambda m: m.update(extra=1), r"unknown fields \['extra'\]"),
    (lambda m: m.update(format_version=2), "format_version 2 is not supported"),
    (lambda m: m.update(default="x"), "default 'x' must name an embedded model"),
    (lambda m: m["models"]["x"]["location"].update(revision="main"), "must be a pinned commit"),
    (lambda m: m["models"]["x"]["files"].pop(WEIGHTS_NAME), r"missing \['model.safetensors'\]"),
    (lambda m: m["models"]["x"]["files"][CONFIG_NAME].update(sha256="xyz"), "sha256 of 64"),
    (lambda m: m["models"]["x"].update(image_size="256"), "'image_size' has the wrong type"),
    (lambda m: m["models"]["x"].update(rollout_kind="magic"), "rollout_kind must be one of"),
    (lambda m: m["models"]["x"].update(location={"embedded": "../outside"}), "inside the package"),
    (lambda m: m["models"].update({"Org/Name": m["models"]["x"]}), "no '/'"),
])
def test_manifest_is_strict(tmp_path, change, expected):
    data = {"format_version": 1, "default": None, "models": {"x": entry_json({CONFIG_NAME: b"", WEIGHTS_NAME: b""},
                                                                              dict(_HUB_LOCATION))}}
    load_manifest(write_manifest(tmp_path / "ok.json", data["models"]))  # the unchanged manifest is valid
    change(data)
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=expected):
        load_manifest(tmp_path / "bad.json")


# ---- save and push ------------------------------------------------------------------------------------------------
INFO = ModelInfo(description="A tiny ALIT for tests.", license="mit", training_data="ImageNet-1k train",
                 recipe="adaptive-tokenizer convert alit_tiny.pth out", name="alit-tiny")


def test_save_pretrained_writes_card_and_loads_back(tok_a, tmp_path):
    tok_a.save_pretrained(tmp_path / "saved", info=INFO)
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [CARD_NAME, CONFIG_NAME, WEIGHTS_NAME]
    card = (tmp_path / "saved" / CARD_NAME).read_text()
    for fact in ("license: mit", "# alit-tiny", "A tiny ALIT for tests.", "256 px", "32 to 256 per image",
                 "quantized", "ImageNet-1k train", "`adaptive-tokenizer convert alit_tiny.pth out`", PAPER_URL,
                 'from_pretrained("alit-tiny")', "@inproceedings"):
        assert fact in card, fact
    assert same_weights(AdaptiveTokenizer.from_pretrained(tmp_path / "saved"), tok_a)


def test_push_to_hub_then_load_by_name(hub, tok_a, tmp_path):
    commit = tok_a.push_to_hub("testorg/pushed", token="hf_write", info=INFO)
    files = hub.repos["testorg/pushed"].commits[commit.oid]
    assert sorted(files) == [CARD_NAME, CONFIG_NAME, WEIGHTS_NAME]
    assert 'from_pretrained("testorg/pushed")' in files[CARD_NAME].decode()
    commits = [h for m, path, h in hub.requests if path == "/api/models/testorg/pushed/commit/main"]
    assert len(commits) == 1 and commits[0]["authorization"] == "Bearer hf_write"

    model_files = {name: files[name] for name in (CONFIG_NAME, WEIGHTS_NAME)}
    manifest = write_manifest(tmp_path / "manifest.json", {"alit-tiny": entry_json(
        model_files, {"repo_id": "testorg/pushed", "revision": commit.oid})})
    assert same_weights(AdaptiveTokenizer.from_pretrained("alit-tiny", manifest=manifest), tok_a)

    branch = tok_a.push_to_hub("testorg/pushed", revision="v2", commit_message="again")
    assert hub.repos["testorg/pushed"].branches["v2"] == branch.oid
    assert same_weights(AdaptiveTokenizer.from_pretrained("testorg/pushed@v2"), tok_a)


# ---- command line ------------------------------------------------------------------------------------------------
def test_cli_models_info_and_push(hub, tiny_repo, tiny_files, converted_dirs, tmp_path, capsys):
    assert main(["models"]) == 0
    shipped = load_manifest()
    out = capsys.readouterr().out
    if shipped.models:
        assert all(name in out for name in shipped.models)
    else:
        assert "no pretrained models in this version's manifest" in out
    manifest = write_manifest(tmp_path / "manifest.json", {"tiny-hub": entry_json(
        tiny_files, {"repo_id": REPO, "revision": tiny_repo["main"]})})
    assert main(["models", "--manifest", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "tiny-hub" in out and "32-256 (step 32)" in out and f"{REPO}@{tiny_repo['main']}" in out

    assert main(["info", "--model", f"{REPO}@v0"]) == 0
    assert '"dynamic_halting_confidence": 0.25' in capsys.readouterr().out
    assert main(["info", "--model", "testorg/missing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adaptive-tokenizer: error: model 'testorg/missing'") and err.count("\n") == 1

    assert main(["push", "--model", str(converted_dirs["A"]), "testorg/cli", "--license", "mit"]) == 0
    out = capsys.readouterr().out
    entry = json.loads(out[out.index("{"):])
    assert entry["location"]["repo_id"] == "testorg/cli"
    assert entry["files"][WEIGHTS_NAME]["sha256"] == hashlib.sha256(tiny_files[WEIGHTS_NAME]).hexdigest()
    pushed = hub.repos["testorg/cli"].commits[entry["location"]["revision"]]
    assert "license: mit" in pushed[CARD_NAME].decode()


def test_environment_variables(hub, tiny_repo):
    """HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE as real environment variables (read at import by huggingface_hub)."""
    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **env}, cwd=ROOT)

    online = run("-m", "adaptive_tokenizer", "info", "--model", REPO)
    assert online.returncode == 0, online.stderr
    assert f"/{REPO}/resolve/main/{CONFIG_NAME}" in hub.paths("GET")
    hub.stop()
    script = ("from adaptive_tokenizer import AdaptiveTokenizer as T, ModelNotFoundError\n"
              f"print(T.from_pretrained({REPO!r}).config.tokens_per_iteration)\n"
              "try:\n    T.from_pretrained('testorg/other')\nexcept ModelNotFoundError as e:\n    print(e)\n")
    offline = run("-c", script, HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.startswith("32\n")
    assert "'testorg/other'" in offline.stdout and "is not cached" in offline.stdout
    assert "HF_HUB_OFFLINE is set" in offline.stdout
