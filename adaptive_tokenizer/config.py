"""Model configuration: frozen dataclasses, serialised to ``config.json``.

A config is plain data. Every config class (``VQGANConfig``, ``LengthPredictorConfig``, ``ModelConfig``) has
``to_dict()`` / ``from_dict()`` (a JSON-ready dict: nested configs as dicts, tuples as lists once in JSON; unknown
fields are refused by name) and ``to_json_string()`` / ``to_json(path)`` / ``from_json(path)``.
``ModelConfig.validate()`` (run on construction) rejects inconsistent sizes with a message naming the field.
Named architectures (the default model's, the authors' sizes) live in :mod:`adaptive_tokenizer.presets`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from .errors import InputError
from .io_utils import write_atomic

CONFIG_FORMAT_VERSION = 1
# ModelConfig fields under their earlier names (config.json files written before the rename): old -> new
RENAMED_FIELDS = {"dynamic_halting_threshold": "dynamic_halting_confidence"}

LatentKind = Literal["quantized", "continuous"]
RolloutKind = Literal["recurrent", "cached"]
ShortcutKind = Literal["branch", "input"]
_Config = TypeVar("_Config", bound="JSONConfig")


class JSONConfig:
    """What every config class shares: ``to_dict``/``from_dict`` and the JSON file round trip.

    ``to_dict``: the dataclass fields (nested configs as dicts). ``from_dict``: the reverse, JSON lists back to
    tuples (frozen dataclasses hold tuples); a field the class does not know is a ValueError naming it (with
    ``_label``, where in a file the dict sits), a missing one takes its default.
    """

    _label: ClassVar[str] = "config"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_Config], data: dict[str, Any]) -> _Config:
        if not isinstance(data, dict):
            raise InputError(f"{cls._label} must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"{cls._label} has unknown fields {unknown}; known fields: {sorted(known)}")
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_json(self, path: str | Path) -> None:
        """Write :meth:`to_json_string` to ``path`` (atomically: the file appears complete or not at all)."""
        write_atomic(path, self.to_json_string().encode())

    @classmethod
    def from_json(cls: type[_Config], path: str | Path) -> _Config:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{path} is not valid JSON (UTF-8): {err}") from None
        if not isinstance(data, dict):
            raise InputError(f"{path} must hold a JSON object")
        return cls.from_dict(data)


@dataclass(frozen=True)
class VQGANConfig(JSONConfig):
    """The frozen 2D base tokenizer: a taming-style VQGAN (conv encoder, codebook, conv decoder).

    The encoder downsamples by ``2 ** (len(ch_mult) - 1)`` with average pooling; the decoder upsamples with
    nearest-neighbour interpolation plus a 3x3 conv. ``attn_resolutions`` lists the feature-map sizes that get a
    self-attention block after each residual block; the authors' checkpoints have none (their code ignores the yaml
    value), so converted models use ``()``. ``norm_groups``: groups of every GroupNorm (the authors' 32). With 32
    channels per level that is one channel per group, which removes each channel's spatial mean at every norm and
    leaves the network no direct path for an image's overall colour and brightness; a narrow model wants fewer.
    ``shortcut``: what the 1x1 shortcut of a channel-changing residual block is applied to. ``"branch"`` (the
    authors'): the residual branch's output, ``shortcut(h) + h``, so such a block does not carry its input forward;
    ``"input"`` (taming's): ``shortcut(x) + h``.
    """

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    z_channels: int = 256
    codebook_size: int = 1024
    codebook_dim: int = 256
    resolution: int = 256
    norm_groups: int = 32
    shortcut: ShortcutKind = "branch"

    _label: ClassVar[str] = "config base"

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.resolution // self.downsample_factor

    def validate(self) -> None:
        _positive(self, "in_channels", "out_channels", "ch", "num_res_blocks", "z_channels", "codebook_size",
                  "codebook_dim", "resolution", "norm_groups")
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise InputError(f"VQGANConfig.ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}")
        for mult in self.ch_mult:
            if (self.ch * mult) % self.norm_groups:
                raise InputError(f"VQGANConfig: channel count ch*mult = {self.ch * mult} must be a multiple of "
                                 f"norm_groups ({self.norm_groups}): every GroupNorm splits the channels into them")
        if self.shortcut not in ("branch", "input"):
            raise InputError(f"VQGANConfig.shortcut must be 'branch' (the authors') or 'input', got {self.shortcut!r}")
        if self.z_channels != self.codebook_dim:
            raise InputError(f"VQGANConfig: z_channels ({self.z_channels}) must equal codebook_dim "
                             f"({self.codebook_dim}): the codebook quantizes the encoder output directly")
        if self.resolution % self.downsample_factor:
            raise InputError(f"VQGANConfig: resolution {self.resolution} is not divisible by the downsampling "
                             f"factor {self.downsample_factor}")


PREDICTOR_FEATURES = ("pixels", "base", "class", "image_tokens", "latents")


@dataclass(frozen=True)
class LengthPredictorConfig(JSONConfig):
    """The length predictor: an MLP from features of the encoder's first iteration to the log of the error at every
    length (``length_predictor.py``).

    ``features``: which feature groups it reads, a subset of ``PREDICTOR_FEATURES`` in that order: ``pixels``
    (gradient energy at four scales, colour statistics), ``base`` (per-channel mean/std of the base encoder's
    features and their distance to the nearest base code), ``class`` (the encoder's class-token output),
    ``image_tokens`` (mean/std of its 2D-token outputs), ``latents`` (mean/std of latent block 0).
    ``hidden``: width of the hidden layer (0: linear). ``num_inputs``: the feature size, fixed by the model.
    ``margin``: the predicted rule takes the first length whose estimate times ``1 + margin`` is ``<=`` the target,
    a safety margin against under-estimates (selected on held-out images when fitted).
    """

    features: tuple[str, ...] = PREDICTOR_FEATURES
    hidden: int = 64
    num_inputs: int = 0
    margin: float = 0.0

    _label: ClassVar[str] = "config length_predictor"

    def validate(self) -> None:
        if not self.features or list(self.features) != [f for f in PREDICTOR_FEATURES if f in self.features]:
            raise InputError(f"LengthPredictorConfig.features must be a non-empty subset of {list(PREDICTOR_FEATURES)} "
                             f"in that order, got {list(self.features)}")
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden < 0:
            raise InputError(f"LengthPredictorConfig.hidden must be an int >= 0, got {self.hidden!r}")
        _positive(self, "num_inputs")
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or not 0 <= self.margin <= 1:
            raise InputError(f"LengthPredictorConfig.margin must be a number in [0, 1], got {self.margin!r}")


@dataclass(frozen=True)
class ModelConfig(JSONConfig):
    """An ALIT model: base tokenizer + latent-distillation encoder/decoder + (optional) latent quantizer.

    Sizes: the encoder sees ``[class token, grid_size**2 image tokens, tokens_per_iteration * (t + 1) latents]``
    at rollout iteration ``t`` (``0 <= t < max_iterations``). Image tokens are the base encoder output
    (``base.z_channels`` dims) concatenated with a ``patch_size`` pixel patch embedding
    (``encoder_width - base.z_channels`` dims).

    ``latent_kind="quantized"``: tokens are ids in ``[0, codebook_size)`` of an l2-normalised codebook of
    ``token_dim``-d vectors. ``"continuous"``: tokens are the ``token_dim``-d float vectors themselves (or
    ``encoder_width``-d when ``factorize_latent`` is False).

    ``dynamic_halting``: after each iteration, a 2D token whose base code the decoder already predicts with
    probability ``>= dynamic_halting_confidence`` is halted for the following iterations: replaced by a mask token
    (``rollout="recurrent"``) or removed from the keys the new latents attend to (``rollout="cached"``). That is a
    per-token probability inside the encoder; the per-image target error of ``encode(halt_threshold=E)`` is another
    thing (``length_rules.py``). Files that call it ``dynamic_halting_threshold`` (its earlier name) still load.

    ``rollout``: ``"recurrent"`` (the authors': each iteration re-encodes the whole sequence) or ``"cached"``
    (block-causal: each iteration encodes only its new latent block against cached keys/values; the tokens of a
    smaller budget are a prefix of those of a larger one).

    ``length_predictor``: the optional head that estimates each image's error at every length from the encoder's
    first iteration (``length_predictor.py``; ``encode(length_rule="predicted")``), None for none.
    """

    base: VQGANConfig = field(default_factory=VQGANConfig)
    image_size: int = 256
    patch_size: int = 16
    encoder_width: int = 512
    encoder_layers: int = 8
    encoder_heads: int = 8
    decoder_width: int = 512
    decoder_layers: int = 8
    decoder_heads: int = 8
    mlp_ratio: float = 4.0
    latent_kind: LatentKind = "quantized"
    factorize_latent: bool = True
    token_dim: int = 12
    codebook_size: int = 4096
    tokens_per_iteration: int = 32
    max_iterations: int = 8
    decoder_max_latent_tokens: int = 256
    dynamic_halting: bool = True
    dynamic_halting_confidence: float = 0.55
    rollout: RolloutKind = "recurrent"
    length_predictor: LengthPredictorConfig | None = None

    def __post_init__(self) -> None:
        # nested configs given as dicts (from_dict, hand-written configs) become config objects
        if not isinstance(self.base, VQGANConfig):
            object.__setattr__(self, "base", VQGANConfig.from_dict(self.base))
        if self.length_predictor is not None and not isinstance(self.length_predictor, LengthPredictorConfig):
            object.__setattr__(self, "length_predictor", LengthPredictorConfig.from_dict(self.length_predictor))
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        """Side of the 2D token grid (16 for 256 px images and 16 px patches)."""
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size**2

    @property
    def max_tokens(self) -> int:
        return self.tokens_per_iteration * self.max_iterations

    @property
    def quantized(self) -> bool:
        return self.latent_kind == "quantized"

    @property
    def latent_dim(self) -> int:
        """Size of one token vector (what the decoder reads): ``token_dim`` when factorised, else the width."""
        return self.token_dim if self.factorize_latent else self.encoder_width

    def validate(self) -> None:
        _positive(self, "image_size", "patch_size", "encoder_width", "encoder_layers", "encoder_heads",
                  "decoder_width", "decoder_layers", "decoder_heads", "token_dim", "codebook_size",
                  "tokens_per_iteration", "max_iterations", "decoder_max_latent_tokens")
        self.base.validate()
        if self.latent_kind not in ("quantized", "continuous"):
            raise InputError(f"ModelConfig.latent_kind must be 'quantized' or 'continuous', got {self.latent_kind!r}")
        if self.rollout not in ("recurrent", "cached"):
            raise InputError(f"ModelConfig.rollout must be 'recurrent' or 'cached', got {self.rollout!r}")
        if self.quantized and not self.factorize_latent:
            raise InputError("ModelConfig: quantized latents require factorize_latent=True")
        if not self.factorize_latent and self.encoder_width != self.decoder_width:
            raise InputError("ModelConfig: without factorize_latent the decoder reads encoder_width-d latents, so "
                             f"encoder_width ({self.encoder_width}) must equal decoder_width ({self.decoder_width})")
        if self.image_size % self.patch_size:
            raise InputError(f"ModelConfig: image_size {self.image_size} not divisible by patch_size {self.patch_size}")
        if self.base.resolution != self.image_size:
            raise InputError(f"ModelConfig: base.resolution ({self.base.resolution}) must equal image_size "
                             f"({self.image_size})")
        if self.base.grid_size != self.grid_size:
            raise InputError(f"ModelConfig: the base tokenizer's grid ({self.base.grid_size}) must equal "
                             f"image_size // patch_size ({self.grid_size})")
        if self.encoder_width <= self.base.z_channels:
            raise InputError(f"ModelConfig: encoder_width ({self.encoder_width}) must exceed base.z_channels "
                             f"({self.base.z_channels}); the difference is the pixel patch embedding width")
        for name in ("encoder", "decoder"):
            width, heads = getattr(self, f"{name}_width"), getattr(self, f"{name}_heads")
            if width % heads:
                raise InputError(f"ModelConfig: {name}_width {width} is not divisible by {name}_heads {heads}")
        if self.max_tokens > self.decoder_max_latent_tokens:
            raise InputError(f"ModelConfig: max tokens ({self.max_tokens}) exceed decoder_max_latent_tokens "
                             f"({self.decoder_max_latent_tokens})")
        if not 0.0 <= self.dynamic_halting_confidence <= 1.0:
            raise InputError("ModelConfig.dynamic_halting_confidence is a probability in [0, 1], got "
                             f"{self.dynamic_halting_confidence}")
        if self.length_predictor is not None:
            self.length_predictor.validate()

    # ---- serialisation (the rest is JSONConfig's) ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields (``base`` and ``length_predictor`` as dicts) and ``format_version``."""
        return {**super().to_dict(), "format_version": CONFIG_FORMAT_VERSION}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if isinstance(data, dict):
            data = dict(data)
            version = data.pop("format_version", CONFIG_FORMAT_VERSION)
            if version != CONFIG_FORMAT_VERSION:
                raise InputError(f"config format_version {version} is not supported (this library reads "
                                 f"{CONFIG_FORMAT_VERSION}); upgrade adaptive-tokenizer")
            for old, new in RENAMED_FIELDS.items():  # files written before a field was renamed still load
                if old in data and new not in data:
                    data[new] = data.pop(old)
        return super().from_dict(data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _positive(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InputError(f"{type(config).__name__}.{name} must be a positive int, got {value!r}")


def __getattr__(name: str) -> Any:
    """``DEFAULT_BASE`` / ``DEFAULT_MODEL``, the default architecture, are defined in :mod:`.presets` (which imports
    this module); they stay importable from here."""
    if name in ("DEFAULT_BASE", "DEFAULT_MODEL"):
        from . import presets

        return getattr(presets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
