"""Pretrained models: the weights manifest, what ``from_pretrained`` accepts, checksums, model cards, the Hub.

``from_pretrained(name_or_path)`` resolves its argument to a local directory holding ``config.json`` and
``model.safetensors``, in this order:

1. ``None``: the manifest's default model, embedded in the package (no network);
2. an ``os.PathLike``, or a string naming an existing path: that directory;
3. a name from the manifest (:func:`list_pretrained`): its files, embedded in the package or downloaded from a Hub
   repo at the pinned revision, are checked against the manifest's sizes and sha256 before anything is loaded;
4. a Hub repo id ``org/name`` or ``org/name@revision``: that repo's ``config.json`` + ``model.safetensors``.

Downloads go through ``huggingface_hub`` (``hf_hub_download``) and its cache, so ``HF_ENDPOINT``,
``HF_HUB_OFFLINE``, ``HF_HOME`` / ``HF_HUB_CACHE`` and ``HF_TOKEN`` work as for any Hub library.

Errors: :class:`ModelNotFoundError` (a ``FileNotFoundError``) when a directory, name, repo, revision or file does not
exist, or a model is not cached while offline; :class:`ChecksumError` (a ``ValueError``) when a file differs from the
manifest; ``ValueError`` for a malformed manifest or contradictory arguments.

The manifest (``weights_manifest.json``, shipped inside the package; README "Pretrained models and the Hub")::

    {"format_version": 1, "default": NAME or null, "models": {NAME: {
        "description": str, "image_size": int, "tokens": {"min": int, "max": int, "step": int},
        "latent_kind": "quantized" | "continuous", "rollout_kind": "recurrent" | ...,
        "location": {"embedded": "weights/NAME"} | {"repo_id": "org/name", "revision": "<40-hex commit>"},
        "files": {"config.json": {"size": int, "sha256": hex}, "model.safetensors": {...}},
        "license": "<Hub licence id>", "provenance": {"training_data": str, "recipe": str}}}}

Every field is required and no other is allowed. Embedded paths are relative to the manifest's folder; the default
model must be embedded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AdaptiveTokenizerError, InputError
from .config import LatentKind, ModelConfig, RolloutKind

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

MANIFEST_FORMAT_VERSION = 1
MANIFEST_PATH = Path(__file__).with_name("weights_manifest.json")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME)

PAPER_TITLE = "Adaptive Length Image Tokenization via Recurrent Allocation"
PAPER_URL = "https://arxiv.org/abs/2411.02393"
PAPER_BIBTEX = """@inproceedings{duggal2025adaptive,
  title     = {Adaptive Length Image Tokenization via Recurrent Allocation},
  author    = {Duggal, Shivam and Isola, Phillip and Torralba, Antonio and Freeman, William T.},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2025}
}"""

LIBRARY_NAME = "adaptive-tokenizer"  # sent in the Hub's user agent, as timm and open_clip do


def _library_version() -> str:
    from . import __version__

    return __version__


_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")  # manifest names never contain "/", so never look like repo ids
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_REPO_SPEC = re.compile(rf"(?P<repo_id>{_REPO_ID.pattern})(@(?P<revision>[^@\s]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


class ModelNotFoundError(FileNotFoundError, AdaptiveTokenizerError):
    """The model asked for cannot be found: no such directory, manifest name, Hub repo, revision or file, or it is
    not cached while offline. The message names the model and says what to do."""


class ChecksumError(InputError):
    """A model file's size or sha256 differs from the weights manifest; nothing was loaded."""


# ---- the manifest --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class ModelInfo:
    """What a model card says that the model's config cannot: written into ``README.md`` on save and push."""

    description: str = ""
    license: str | None = None  # a Hub licence id: "mit", "apache-2.0", "other", ...
    training_data: str | None = None
    recipe: str | None = None  # the command that trained (or converted) the model
    name: str | None = None  # the manifest name, when it has one


@dataclass(frozen=True)
class ManifestEntry:
    """One pretrained model of the manifest. Exactly one of ``embedded`` (absolute folder) and ``repo_id`` (with a
    pinned commit ``revision``) is set."""

    name: str
    description: str
    image_size: int
    tokens_min: int
    tokens_max: int
    tokens_step: int
    latent_kind: str
    rollout_kind: str
    embedded: Path | None
    repo_id: str | None
    revision: str | None
    files: dict[str, FileEntry]
    license: str
    training_data: str
    recipe: str

    @property
    def where(self) -> str:
        """Where the files are, in words: ``embedded`` or ``org/name@commit``."""
        return "embedded" if self.embedded is not None else f"{self.repo_id}@{self.revision}"

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(description=self.description, license=self.license, training_data=self.training_data,
                         recipe=self.recipe, name=self.name)

    def check_config(self, config: ModelConfig) -> None:
        """ValueError naming every fact of this entry that the model's config contradicts."""
        expected = {"image_size": self.image_size, "latent_kind": self.latent_kind, "rollout_kind": self.rollout_kind,
                    "tokens": (self.tokens_min, self.tokens_max, self.tokens_step)}
        actual = {"image_size": config.image_size, "latent_kind": config.latent_kind, "rollout_kind": config.rollout,
                  "tokens": (config.tokens_per_iteration, config.max_tokens, config.tokens_per_iteration)}
        wrong = [f"{key} {expected[key]} != config {actual[key]}" for key in expected if expected[key] != actual[key]]
        if wrong:
            raise InputError(f"manifest entry {self.name!r} does not match its config.json: " + "; ".join(wrong))


@dataclass(frozen=True)
class Manifest:
    path: Path
    default: str | None
    models: dict[str, ManifestEntry]

    def default_hint(self) -> str:
        """One sentence pointing to the embedded default model (or saying there is none)."""
        if self.default is None:
            return ("No model is embedded in this version of adaptive-tokenizer, so offline use needs the model in "
                    "the cache or a local directory holding config.json and model.safetensors.")
        return (f"The embedded default model {self.default!r} needs no download: "
                "AdaptiveTokenizer.from_pretrained() with no argument.")


def load_manifest(path: str | os.PathLike = MANIFEST_PATH) -> Manifest:
    """Read and validate a weights manifest (default: the one shipped with the package)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not a weights manifest (not UTF-8 JSON: {err})") from None
    _fields(data, str(path), {"format_version": int, "default": (str, type(None)), "models": dict})
    if data["format_version"] != MANIFEST_FORMAT_VERSION:
        raise InputError(f"{path}: format_version {data['format_version']} is not supported (this library reads "
                         f"{MANIFEST_FORMAT_VERSION}); upgrade adaptive-tokenizer")
    models = {name: _parse_entry(name, value, path) for name, value in data["models"].items()}
    default = data["default"]
    if default is not None and (default not in models or models[default].embedded is None):
        raise InputError(f"{path}: default {default!r} must name an embedded model of the manifest")
    return Manifest(path, default, models)


def list_pretrained(manifest: str | os.PathLike | Manifest | None = None) -> list[ManifestEntry]:
    """The models of the manifest (default: the shipped one), sorted by name; ``entry.name`` is what
    ``from_pretrained`` takes."""
    manifest = _as_manifest(manifest)
    return [manifest.models[name] for name in sorted(manifest.models)]


def _as_manifest(manifest: str | os.PathLike | Manifest | None) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else load_manifest(manifest or MANIFEST_PATH)


def _parse_entry(name: str, value: Any, path: Path) -> ManifestEntry:
    where = f"{path}: models.{name}"
    if not _NAME.fullmatch(name):
        raise InputError(f"{where}: a model name is lower-case letters, digits, '.', '_' and '-' (no '/')")
    entry = _fields(value, where, {"description": str, "image_size": int, "tokens": dict, "latent_kind": str,
                                   "rollout_kind": str, "location": dict, "files": dict, "license": str,
                                   "provenance": dict})
    tokens = _fields(entry["tokens"], f"{where}.tokens", {"min": int, "max": int, "step": int})
    if not 0 < tokens["step"] <= tokens["min"] <= tokens["max"] or tokens["min"] % tokens["step"] \
            or tokens["max"] % tokens["step"]:
        raise InputError(f"{where}.tokens: need 0 < step <= min <= max, min and max multiples of step; got {tokens}")
    for key, kinds in (("latent_kind", LatentKind), ("rollout_kind", RolloutKind)):
        if entry[key] not in typing.get_args(kinds):
            raise InputError(f"{where}.{key} must be one of {list(typing.get_args(kinds))}, got {entry[key]!r}")
    provenance = _fields(entry["provenance"], f"{where}.provenance", {"training_data": str, "recipe": str})
    embedded, repo_id, revision = _parse_location(entry["location"], f"{where}.location", path.parent)
    return ManifestEntry(
        name=name, description=entry["description"], image_size=entry["image_size"], tokens_min=tokens["min"],
        tokens_max=tokens["max"], tokens_step=tokens["step"], latent_kind=entry["latent_kind"],
        rollout_kind=entry["rollout_kind"], embedded=embedded, repo_id=repo_id, revision=revision,
        files=_parse_files(entry["files"], f"{where}.files"), license=entry["license"],
        training_data=provenance["training_data"], recipe=provenance["recipe"])


def _parse_location(value: Any, where: str, root: Path) -> tuple[Path | None, str | None, str | None]:
    """``(embedded folder, None, None)`` or ``(None, repo_id, pinned commit)``."""
    if isinstance(value, dict) and "embedded" in value:
        relative = _fields(value, where, {"embedded": str})["embedded"]
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise InputError(f"{where}.embedded must be a path inside the package, relative to the manifest, "
                             f"got {relative!r}")
        return root / relative, None, None
    location = _fields(value, where, {"repo_id": str, "revision": str})
    if not _REPO_ID.fullmatch(location["repo_id"]):
        raise InputError(f"{where}.repo_id must look like org/name, got {location['repo_id']!r}")
    if not _COMMIT.fullmatch(location["revision"]):
        raise InputError(f"{where}.revision must be a pinned commit (40 lower-case hex digits), got "
                         f"{location['revision']!r}")
    return None, location["repo_id"], location["revision"]


def _parse_files(value: dict[str, Any], where: str) -> dict[str, FileEntry]:
    missing = [name for name in MODEL_FILES if name not in value]
    if missing:
        raise InputError(f"{where}: missing {missing}; every model lists {list(MODEL_FILES)}")
    files = {}
    for name, item in value.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise InputError(f"{where}: file name {name!r} must be relative, inside the model folder")
        item = _fields(item, f"{where}.{name}", {"size": int, "sha256": str})
        if not _SHA256.fullmatch(item["sha256"]) or item["size"] < 0:
            raise InputError(f"{where}.{name}: need a size >= 0 and a sha256 of 64 lower-case hex digits, got {item}")
        files[name] = FileEntry(item["size"], item["sha256"])
    return files


def _fields(value: Any, where: str, schema: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """``value`` if it is a JSON object with exactly the keys of ``schema``, each of its type; else ValueError naming
    the missing, unknown and mistyped fields."""
    if not isinstance(value, dict):
        raise InputError(f"{where} must be a JSON object, got {type(value).__name__}")
    problems = []
    if missing := sorted(set(schema) - set(value)):
        problems.append(f"missing fields {missing}")
    if unknown := sorted(set(value) - set(schema)):
        problems.append(f"unknown fields {unknown} (known: {sorted(schema)})")
    for key, kind in schema.items():
        if key in value and (not isinstance(value[key], kind) or isinstance(value[key], bool)):
            problems.append(f"{key!r} has the wrong type ({type(value[key]).__name__})")
    if problems:
        raise InputError(f"{where}: " + "; ".join(problems))
    return value


# ---- checksums -----------------------------------------------------------------------------------------------
def file_entry(path: str | os.PathLike) -> FileEntry:
    """Size and sha256 of a file, read in chunks (what a manifest entry records)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileEntry(size, digest.hexdigest())


def verify_files(entry: ManifestEntry, paths: Mapping[str, Path]) -> None:
    """ChecksumError naming the first file whose size or sha256 differs from ``entry``."""
    for name, expected in entry.files.items():
        actual = file_entry(paths[name])
        if actual != expected:
            remedy = ("the installation is damaged: reinstall adaptive-tokenizer" if entry.embedded is not None
                      else f"delete the cache folder {paths[name].parents[2]} to download it again")
            raise ChecksumError(
                f"model {entry.name!r}: {name} ({paths[name]}) fails its checksum: expected sha256 {expected.sha256} "
                f"({expected.size} bytes), got sha256 {actual.sha256} ({actual.size} bytes). Nothing was loaded; "
                f"{remedy}.")


# ---- resolving from_pretrained's argument --------------------------------------------------------------------
@dataclass(frozen=True)
class ResolvedModel:
    """A local directory holding the model files, and the manifest entry they were checked against (if any)."""

    directory: Path
    entry: ManifestEntry | None = None


def resolve(name_or_path: str | os.PathLike | None = None, *, revision: str | None = None,
            cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
            token: str | bool | None = None, manifest: str | os.PathLike | Manifest | None = None) -> ResolvedModel:
    """``from_pretrained``'s argument -> local files (downloaded and verified as needed); see the module doc."""
    manifest = _as_manifest(manifest)
    hub_args = {"cache_dir": cache_dir, "local_files_only": local_files_only, "token": token, "manifest": manifest}
    if name_or_path is None:
        _no_revision(revision, "the embedded default model has no revisions")
        if manifest.default is None:
            raise ModelNotFoundError(
                "no embedded default model ships with this version of adaptive-tokenizer yet; pass a model name "
                "(see `adaptive-tokenizer models`), a Hub repo id org/name, or a directory holding config.json and "
                "model.safetensors (convert the authors' checkpoints with `adaptive-tokenizer convert CKPT.pth "
                "OUT_DIR`)")
        return _resolve_entry(manifest.models[manifest.default], **hub_args)
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, os.PathLike) or os.path.exists(text):
        _no_revision(revision, f"{text} is a local directory")
        return ResolvedModel(_local_dir(text, manifest))
    if text in manifest.models:
        _no_revision(revision, f"the manifest pins the revision of {text!r}")
        return _resolve_entry(manifest.models[text], **hub_args)
    if match := _REPO_SPEC.fullmatch(text):
        if match["revision"] and revision and match["revision"] != revision:
            raise InputError(f"{text!r} names revision {match['revision']!r} but revision={revision!r} was passed")
        return _resolve_repo(text, match["repo_id"], match["revision"] or revision or "main", **hub_args)
    return ResolvedModel(_local_dir(text, manifest))


def _no_revision(revision: str | None, why: str) -> None:
    if revision is not None:
        raise InputError(f"revision={revision!r} applies to Hub repo ids only; {why}")


def _local_dir(text: str, manifest: Manifest) -> Path:
    directory = Path(text)
    if not directory.is_dir():
        names = ", ".join(sorted(manifest.models)) or "none in this version"
        raise ModelNotFoundError(
            f"no model directory at {directory}: from_pretrained expects a directory holding {CONFIG_NAME} and "
            f"{WEIGHTS_NAME}, a model name (known: {names}) or a Hub repo id org/name[@revision]")
    return directory


def _resolve_entry(entry: ManifestEntry, **hub_args: Any) -> ResolvedModel:
    if entry.embedded is not None:
        paths = {name: entry.embedded / name for name in entry.files}
        for name, path in paths.items():
            if not path.is_file():
                raise ModelNotFoundError(f"model {entry.name!r} should be embedded at {path}, but that file is "
                                         "missing: the installation is incomplete; reinstall adaptive-tokenizer")
    else:
        paths = {name: _download(entry.repo_id, name, entry.revision, model=entry.name, **hub_args)  # type: ignore
                 for name in entry.files}
    verify_files(entry, paths)
    return ResolvedModel(paths[CONFIG_NAME].parent, entry)


def _resolve_repo(model: str, repo_id: str, revision: str, **hub_args: Any) -> ResolvedModel:
    config_path = _download(repo_id, CONFIG_NAME, revision, model=model, **hub_args)
    # The cache keeps files under snapshots/<commit>/: fetch the weights of that very commit, even if the branch
    # moves meanwhile.
    commit = config_path.parent.name
    _download(repo_id, WEIGHTS_NAME, commit if _COMMIT.fullmatch(commit) else revision, model=model, **hub_args)
    return ResolvedModel(config_path.parent)


def _download(repo_id: str, filename: str, revision: str, *, model: str, manifest: Manifest,
              cache_dir: str | os.PathLike | None, local_files_only: bool, token: str | bool | None) -> Path:
    """One file through the Hub cache; Hub errors become :class:`ModelNotFoundError` naming model, repo, revision,
    file."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    what = f"model {model!r}: {filename} of Hub repo {repo_id} at revision {revision}"
    endpoint = constants.ENDPOINT
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                    local_files_only=local_files_only, token=token, library_name=LIBRARY_NAME,
                                    library_version=_library_version()))
    except GatedRepoError as err:
        raise ModelNotFoundError(f"{what}: the repo is gated on {endpoint}; accept its conditions there and pass "
                                 "token= (or log in with `hf auth login`)") from err
    except RepositoryNotFoundError as err:
        raise ModelNotFoundError(f"{what}: no such repo on {endpoint} (or it is private: pass token=), and no local "
                                 f"directory {repo_id} exists either") from err
    except RevisionNotFoundError as err:
        raise ModelNotFoundError(f"{what}: the repo has no revision {revision!r}") from err
    except RemoteEntryNotFoundError as err:
        raise ModelNotFoundError(f"{what}: the repo has no file {filename!r} at that revision; a model repo holds "
                                 f"{CONFIG_NAME} and {WEIGHTS_NAME}") from err
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        if local_files_only:
            why = "local_files_only=True"
        elif constants.is_offline_mode():
            why = "HF_HUB_OFFLINE is set"
        else:
            why = f"the Hub at {endpoint} could not be reached ({err.__cause__ or err})"
        cache = cache_dir if cache_dir is not None else constants.HF_HUB_CACHE
        raise ModelNotFoundError(f"{what} is not cached (in {cache}) and {why}. {manifest.default_hint()}") from err
    except HfHubHTTPError as err:
        raise ModelNotFoundError(f"{what}: the download from {endpoint} failed: {str(err).splitlines()[0]}") from err


# ---- model cards and pushing ---------------------------------------------------------------------------------
def render_model_card(config: ModelConfig, info: ModelInfo | None = None, *, load_as: str | None = None) -> str:
    """``README.md`` for a model folder or Hub repo: the manifest facts, the config's sizes, use, the paper."""
    info = info or ModelInfo()
    title = info.name or load_as or "ALIT image tokenizer"
    load_as = load_as or info.name or "path/to/this/folder"
    front = ["---", "library_name: adaptive-tokenizer", "tags:", "- image-tokenizer", "- alit"]
    if info.license:
        front.insert(1, f"license: {info.license}")
    latent = (f"quantized: ids of {config.codebook_size} codes ({config.token_dim}-d)" if config.quantized
              else f"continuous: {config.latent_dim}-d float vectors")
    halting = (f"on (p >= {config.dynamic_halting_confidence})" if config.dynamic_halting else "off")
    length_rule = "fewest tokens whose mean absolute pixel error is <= `halt_threshold`"
    length_rule += ("; length predictor included (`length_rule=\"predicted\"`)" if config.length_predictor
                    else "; no length predictor")
    facts = [("image size", f"{config.image_size} px"),
             ("tokens", f"{config.tokens_per_iteration} to {config.max_tokens} per image, in steps of "
                        f"{config.tokens_per_iteration}"),
             ("latent kind", latent), ("rollout", config.rollout), ("dynamic halting", halting),
             ("adaptive length", length_rule),
             ("licence", info.license or "not recorded"), ("training data", info.training_data or "not recorded"),
             ("recipe", f"`{info.recipe}`" if info.recipe else "not recorded")]
    lines = [*front, "---", "", f"# {title}", ""]
    if info.description:
        lines += [info.description, ""]
    lines += [f"An ALIT adaptive-length image tokenizer: images to a variable number of tokens and back "
              f"([{PAPER_TITLE}]({PAPER_URL}), ICLR 2025).", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in facts]
    lines += ["", "## Use", "", "```python", "from adaptive_tokenizer import AdaptiveTokenizer", "",
              f'tok = AdaptiveTokenizer.from_pretrained("{load_as}")',
              'result = tok.encode("photo.jpg", halt_threshold=0.07)  # per-image token count',
              "pixels = tok.decode(result)", "```", "",
              f"Files: `{CONFIG_NAME}` and `{WEIGHTS_NAME}` (safetensors: loading never unpickles anything).", "",
              "## Citation", "", "```bibtex", PAPER_BIBTEX, "```", ""]
    return "\n".join(lines)


def push_folder(directory: str | os.PathLike, repo_id: str, *, token: str | None = None,
                revision: str | None = None, private: bool | None = None,
                commit_message: str = "Upload ALIT model") -> CommitInfo:
    """Create ``repo_id`` if needed (and branch ``revision``), then commit the model files and card of
    ``directory``; returns the commit (``.oid`` is the hash to pin in a manifest)."""
    from huggingface_hub import HfApi

    if not _REPO_ID.fullmatch(repo_id):
        raise InputError(f"repo id must look like org/name, got {repo_id!r}")
    api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=_library_version())
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=directory, revision=revision, commit_message=commit_message,
                             allow_patterns=[*MODEL_FILES, CARD_NAME])
