"""Qwen3.5 model configuration: presets for the real sizes and loading of any
Hugging Face ``config.json`` (the multimodal ``qwen3_5`` wrapper with a
``text_config``, or a bare ``qwen3_5_text``).

The vision tower's hyper-parameters are a :class:`VisionConfig`; what an
image goes through before the tower (the resize rule and the normalisation of
the checkpoint's ``preprocessor_config.json``) is an :class:`ImageProcessorConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, ClassVar

from ..errors import UserError

LINEAR, FULL = "linear_attention", "full_attention"

# Special token ids of the Qwen3.5 tokenizer (architecture doc, "Model family").
ENDOFTEXT_ID = 248044
IM_START_ID = 248045
IM_END_ID = 248046
VISION_START_ID = 248053
VISION_END_ID = 248054
IMAGE_PAD_ID = 248056
VIDEO_PAD_ID = 248057
THINK_ID = 248068
END_THINK_ID = 248069
STOP_TOKEN_IDS = (IM_END_ID, ENDOFTEXT_ID)
TOKENIZER_SIZE = 248077  # ids 0..248076; the embedding is padded to vocab_size


class ConfigError(UserError):
    """A config.json we cannot compile; the message names the field."""


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


VISION_ROPE_THETA = 10000.0  # the tower's axial RoPE (transformers' default for "axial")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower's hyper-parameters: a ``config.json``'s ``vision_config``,
    named as in Hugging Face's ``Qwen3_5VisionConfig`` (architecture doc,
    "Vision tower").  Not compiled yet.

    The sizes that differ between the models (:attr:`REQUIRED`) must be given;
    the rest default like transformers', to the values the whole family
    shares.  ``to_json()`` is the ``vision_config`` itself (with its
    ``model_type``) and :meth:`from_json` reads one back, checking every field.
    """

    depth: int  # transformers' alias: num_hidden_layers
    hidden_size: int
    num_heads: int  # transformers' alias: num_attention_heads
    intermediate_size: int
    out_hidden_size: int  # the merger's output: the text decoder's hidden_size
    hidden_act: str = "gelu_pytorch_tanh"
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304  # a learned square table (48 x 48)

    MODEL_TYPE: ClassVar[str] = "qwen3_5_vision"
    # Older checkpoints say "qwen3_5"; transformers reads them as "qwen3_5_vision".
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("qwen3_5_vision", "qwen3_5")
    REQUIRED: ClassVar[tuple[str, ...]] = (
        "depth",
        "hidden_size",
        "num_heads",
        "intermediate_size",
        "out_hidden_size",
    )
    ACTIVATIONS: ClassVar[tuple[str, ...]] = ("gelu_pytorch_tanh",)

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_side(self) -> int:
        """Side of the learned position table (48 for 2304 entries)."""
        return math.isqrt(self.num_position_embeddings)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and not _positive_int(value):  # annotations are strings here
                raise ConfigError(
                    f"config field 'vision_config.{f.name}' must be a positive integer, "
                    f"got {value!r}"
                )
        act = self.hidden_act
        if not isinstance(act, str):
            raise ConfigError(
                f"config field 'vision_config.hidden_act' must be a string, got {act!r}"
            )
        if act not in self.ACTIVATIONS:
            raise ConfigError(
                f"config field 'vision_config.hidden_act' is {act!r}; Qwen3.5's vision tower "
                f"uses {' or '.join(repr(a) for a in self.ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"config field 'vision_config.hidden_size' ({self.hidden_size}) is not a "
                f"multiple of 'vision_config.num_heads' ({self.num_heads})"
            )
        if self.grid_side**2 != self.num_position_embeddings:
            raise ConfigError(
                f"config field 'vision_config.num_position_embeddings' "
                f"({self.num_position_embeddings}) must be a square number: the learned "
                "position table is a square grid"
            )

    def to_json(self) -> dict[str, Any]:
        """The Hugging Face ``vision_config``."""
        return {"model_type": self.MODEL_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, raw: object) -> VisionConfig:
        """Parse a ``vision_config`` (of a ``config.json``, or :meth:`to_json`'s);
        a :class:`ConfigError` names the field that is missing or wrong.  Fields
        the tower does not depend on (``initializer_range``...) are ignored."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config field 'vision_config' must be an object, got {raw!r}")
        model_type = raw.get("model_type", cls.MODEL_TYPE)
        if model_type not in cls.MODEL_TYPES:
            raise ConfigError(
                f"config field 'vision_config.model_type' is {model_type!r}; "
                f"expected '{cls.MODEL_TYPE}'"
            )
        if raw.get("deepstack_visual_indexes"):
            raise ConfigError(
                "config field 'vision_config.deepstack_visual_indexes' is not empty; "
                "Qwen3.5 has no deepstack"
            )
        for name in cls.REQUIRED:
            if name not in raw:
                raise ConfigError(f"config field 'vision_config.{name}' is missing")
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial" or rope.get("rope_theta", 1e4) != 1e4:
            raise ConfigError(
                f"config field 'vision_config.rope_parameters' is {rope!r}; the tower is "
                f"compiled with Qwen3.5's axial 2-D RoPE, theta {VISION_ROPE_THETA:g}"
            )
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """What happens to an image before the tower: a checkpoint's
    ``preprocessor_config.json`` (transformers' ``Qwen2VLImageProcessor``, the
    processor of every Qwen3.5 size).

    The resize rule (``smart_resize``): both sides rounded to multiples of
    ``patch_size * merge_size`` (32), the pixel count kept within
    ``[min_pixels, max_pixels]`` (the file's ``size.shortest_edge`` and
    ``size.longest_edge``, despite their names), resampled with PIL filter
    ``resample`` (3 = bicubic).  Then ``(x * rescale_factor - mean) / std`` per
    channel, which the compiled graph does (``image_embed`` takes uint8 RGB).
    The defaults are Qwen3-VL's published file, which Qwen3.5 shares.
    """

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536  # 256 x 256
    max_pixels: int = 16777216  # 4096 x 4096
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL.Image.Resampling.BICUBIC

    FILE: ClassVar[str] = "preprocessor_config.json"

    def __post_init__(self):
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            if not _positive_int(getattr(self, name)):
                raise ConfigError(
                    f"{self.FILE}: '{name}' must be a positive integer, got {getattr(self, name)!r}"
                )
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
                raise ConfigError(f"{self.FILE}: '{name}' must be 3 numbers, got {value!r}")
        if not all(v > 0 for v in self.image_std):
            raise ConfigError(f"{self.FILE}: 'image_std' must be positive, got {self.image_std!r}")
        if self.min_pixels > self.max_pixels:
            raise ConfigError(
                f"{self.FILE}: size.shortest_edge ({self.min_pixels}) is larger than "
                f"size.longest_edge ({self.max_pixels})"
            )
        if self.resample not in (0, 1, 2, 3, 4, 5):
            raise ConfigError(f"{self.FILE}: 'resample' {self.resample!r} is no PIL filter")

    @property
    def factor(self) -> int:
        """Image sides are multiples of this (32): a merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    def check(self, vision: VisionConfig) -> None:
        """The processor must cut the patches the tower was trained on."""
        for ours, theirs in (
            ("patch_size", "patch_size"),
            ("temporal_patch_size", "temporal_patch_size"),
            ("merge_size", "spatial_merge_size"),
        ):
            if getattr(self, ours) != getattr(vision, theirs):
                raise ConfigError(
                    f"{self.FILE}: '{ours}' is {getattr(self, ours)} but the config's "
                    f"'vision_config.{theirs}' is {getattr(vision, theirs)}"
                )

    def to_hf(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` transformers reads."""
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen3VLProcessor",
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
            "resample": self.resample,
        }

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ImageProcessorConfig:
        """The inverse of :meth:`to_json` (an artifact's description)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**values)

    @classmethod
    def from_hf(cls, raw: object) -> ImageProcessorConfig:
        """Parse a ``preprocessor_config.json``; a :class:`ConfigError` names the field.
        A processor that skips a step the compiled graph always does is refused."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{cls.FILE} must hold a JSON object")
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if raw.get(flag, True) is not True:
                raise ConfigError(
                    f"{cls.FILE}: '{flag}' is {raw[flag]!r}; the compiled image path always does it"
                )
        values: dict[str, Any] = {}
        size = raw.get("size") or {}
        if not isinstance(size, dict):
            raise ConfigError(f"{cls.FILE}: 'size' must be an object, got {size!r}")
        for ours, keys in (
            ("min_pixels", ("min_pixels", "shortest_edge")),
            ("max_pixels", ("max_pixels", "longest_edge")),
        ):
            for key in keys:
                if key in raw:
                    values[ours] = raw[key]
                if key in size:
                    values[ours] = size[key]
        for name in (
            "patch_size",
            "temporal_patch_size",
            "merge_size",
            "rescale_factor",
            "resample",
        ):
            if name in raw:
                values[name] = raw[name]
        for name in ("image_mean", "image_std"):
            if name in raw:
                value = raw[name]
                values[name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    @classmethod
    def load(cls, ckpt_dir: str | Path | None) -> ImageProcessorConfig:
        """A checkpoint's ``preprocessor_config.json``, or the defaults when it has none
        (or there is no checkpoint: a preset)."""
        file = None if ckpt_dir is None else Path(ckpt_dir) / cls.FILE
        if file is None or not file.exists():
            return cls()
        try:
            raw = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        return cls.from_hf(raw)


@dataclasses.dataclass(frozen=True)
class Qwen35Config:
    """The text decoder's hyper-parameters, named as in Hugging Face's
    ``Qwen3_5TextConfig``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    layer_types: tuple[str, ...]
    tie_word_embeddings: bool
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e7
    partial_rotary_factor: float = 0.25
    max_position_embeddings: int = 262144
    hidden_act: str = "silu"
    attention_bias: bool = False
    attn_output_gate: bool = True
    mtp_num_hidden_layers: int = 1
    vision: VisionConfig | None = None  # the vision tower (a multimodal checkpoint's vision_config)

    def __post_init__(self):
        self.validate()

    # ---- derived sizes -------------------------------------------------
    @property
    def full_attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == FULL]

    @property
    def linear_attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == LINEAR]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:  # Hk * Dk
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:  # Hv * Dv
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:  # channels of the causal conv: q, k and v
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def mrope_section(self) -> list[int]:
        """Three sections summing to rotary_dim / 2 ([11, 11, 10] for 64)."""
        base, rem = divmod(self.rotary_dim // 2, 3)
        return [base + (i < rem) for i in range(3)]

    def num_params(self) -> int:
        """Parameters of the text decoder (embedding counted once if tied)."""
        h, i = self.hidden_size, self.intermediate_size
        attn = (
            h * self.num_attention_heads * self.head_dim * 2
            + 2 * h * self.num_key_value_heads * self.head_dim
        )
        attn += self.num_attention_heads * self.head_dim * h + 2 * self.head_dim
        hv = self.linear_num_value_heads
        gdn = (
            h * (self.conv_dim + self.linear_value_dim + 2 * hv)
            + self.conv_dim * self.linear_conv_kernel_dim
        )
        gdn += 2 * hv + self.linear_value_head_dim + self.linear_value_dim * h
        per_layer_common = 3 * h * i + 2 * h
        total = len(self.full_attention_layers) * attn + len(self.linear_attention_layers) * gdn
        total += self.num_hidden_layers * per_layer_common + h + self.vocab_size * h
        if not self.tie_word_embeddings:
            total += self.vocab_size * h
        return total

    # ---- checks --------------------------------------------------------
    def validate(self) -> None:
        positive = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "linear_num_key_heads",
            "linear_num_value_heads",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_conv_kernel_dim",
            "max_position_embeddings",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(
                    f"config field '{name}' must be a positive integer, got {value!r}"
                )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"config field 'layer_types' lists {len(self.layer_types)} layers "
                f"but 'num_hidden_layers' is {self.num_hidden_layers}"
            )
        for i, t in enumerate(self.layer_types):
            if t not in (LINEAR, FULL):
                raise ConfigError(
                    f"config field 'layer_types[{i}]' is {t!r}; expected '{LINEAR}' or '{FULL}'"
                )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field 'num_attention_heads' ({self.num_attention_heads}) is not a multiple of "
                f"'num_key_value_heads' ({self.num_key_value_heads})"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(
                f"config field 'linear_num_value_heads' ({self.linear_num_value_heads}) is not a multiple of "
                f"'linear_num_key_heads' ({self.linear_num_key_heads})"
            )
        rot = self.head_dim * self.partial_rotary_factor
        if not (0 < self.partial_rotary_factor <= 1) or rot != int(rot) or int(rot) % 2:
            raise ConfigError(
                f"config field 'partial_rotary_factor' ({self.partial_rotary_factor}) times 'head_dim' "
                f"({self.head_dim}) must be an even number of dimensions"
            )
        if self.hidden_act != "silu":
            raise ConfigError(
                f"config field 'hidden_act' is {self.hidden_act!r}; Qwen3.5 uses 'silu'"
            )
        if self.attention_bias:
            raise ConfigError(
                "config field 'attention_bias' is true; Qwen3.5 has no attention bias"
            )
        if not self.attn_output_gate:
            raise ConfigError(
                "config field 'attn_output_gate' is false; only gated attention is supported"
            )
        if not (self.rms_norm_eps > 0) or not (self.rope_theta > 0):
            raise ConfigError("config fields 'rms_norm_eps' and 'rope_theta' must be positive")
        if self.vision is not None:
            if not isinstance(self.vision, VisionConfig):
                kind = type(self.vision).__name__
                raise ConfigError(f"config field 'vision' must be a VisionConfig, got {kind}")
            if self.vision.out_hidden_size != self.hidden_size:
                raise ConfigError(
                    f"config field 'vision_config.out_hidden_size' ({self.vision.out_hidden_size}) "
                    f"differs from the text decoder's 'hidden_size' ({self.hidden_size}): image "
                    "features replace token embeddings"
                )

    # ---- conversion ----------------------------------------------------
    def text_config_dict(self) -> dict[str, Any]:
        """The ``text_config`` of a Hugging Face ``config.json``."""
        return {
            "model_type": "qwen3_5_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "linear_num_key_heads": self.linear_num_key_heads,
            "linear_num_value_heads": self.linear_num_value_heads,
            "linear_key_head_dim": self.linear_key_head_dim,
            "linear_value_head_dim": self.linear_value_head_dim,
            "linear_conv_kernel_dim": self.linear_conv_kernel_dim,
            "layer_types": list(self.layer_types),
            "full_attention_interval": 4,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": self.hidden_act,
            "attention_bias": self.attention_bias,
            "attn_output_gate": self.attn_output_gate,
            "max_position_embeddings": self.max_position_embeddings,
            "mamba_ssm_dtype": "float32",
            "mtp_num_hidden_layers": self.mtp_num_hidden_layers,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
                "mrope_section": self.mrope_section,
                "mrope_interleaved": True,
            },
            "bos_token_id": None,
            "eos_token_id": ENDOFTEXT_ID,
        }

    def hf_config_dict(self) -> dict[str, Any]:
        """A complete multimodal ``config.json`` (``Qwen3_5ForConditionalGeneration``)."""
        out = {
            "architectures": ["Qwen3_5ForConditionalGeneration"],
            "model_type": "qwen3_5",
            "text_config": self.text_config_dict(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "image_token_id": IMAGE_PAD_ID,
            "video_token_id": VIDEO_PAD_ID,
            "vision_start_token_id": VISION_START_ID,
            "vision_end_token_id": VISION_END_ID,
        }
        if self.vision is not None:
            out["vision_config"] = self.vision.to_json()
        return out

    def replace(self, **changes) -> Qwen35Config:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["vision"] = None if self.vision is None else self.vision.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Qwen35Config:
        """The inverse of :meth:`to_json` (an artifact's manifest ``config``)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields}
        if values.get("vision") is not None:
            values["vision"] = VisionConfig.from_json(values["vision"])
        return cls(**values)


def default_layer_types(
    num_hidden_layers: int, full_attention_interval: int = 4
) -> tuple[str, ...]:
    """Layer i is full attention when (i + 1) % interval == 0."""
    return tuple(
        FULL if (i + 1) % full_attention_interval == 0 else LINEAR for i in range(num_hidden_layers)
    )


def _vision(depth, hidden, heads, intermediate, out_hidden) -> VisionConfig:
    return VisionConfig(
        depth=depth,
        hidden_size=hidden,
        num_heads=heads,
        intermediate_size=intermediate,
        out_hidden_size=out_hidden,
    )


def _preset(hidden, inter, layers, heads, kv_heads, lk, lv, tie, vision, **extra) -> Qwen35Config:
    fields = dict(
        vocab_size=248320,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=256,
        linear_num_key_heads=lk,
        linear_num_value_heads=lv,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        layer_types=default_layer_types(layers),
        tie_word_embeddings=tie,
        vision=vision,
    )
    fields.update(extra)
    return Qwen35Config(**fields)


# The real sizes (architecture doc, "Model family").  The 2B vision heads and
# intermediate size are unverified there; 16 / 4096 follow the 4B tower.
PRESETS: dict[str, Qwen35Config] = {
    "qwen3.5-0.8b": _preset(1024, 3584, 24, 8, 2, 16, 16, True, _vision(12, 768, 12, 3072, 1024)),
    "qwen3.5-2b": _preset(2048, 6144, 24, 8, 2, 16, 16, True, _vision(24, 1024, 16, 4096, 2048)),
    "qwen3.5-4b": _preset(2560, 9216, 32, 16, 4, 16, 32, True, _vision(24, 1024, 16, 4096, 2560)),
    "qwen3.5-9b": _preset(4096, 12288, 32, 16, 4, 16, 32, False, _vision(27, 1152, 16, 4304, 4096)),
    # Random-weight test models: the real vocabulary (so the real tokenizer
    # works) on a tiny body.  head_dim 32 keeps partial RoPE (8 rotary dims).
    "tiny": _preset(
        64,
        128,
        4,
        4,
        2,
        2,
        2,
        True,
        _vision(1, 32, 2, 64, 64),
        head_dim=32,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        max_position_embeddings=4096,
    ),
}
# Variants for the parity tests: the GQA ratio of 4B/9B and the untied head of 9B.
PRESETS["tiny-gva"] = PRESETS["tiny"].replace(linear_num_value_heads=4)
PRESETS["tiny-untied"] = PRESETS["tiny"].replace(tie_word_embeddings=False)


def preset(name: str) -> Qwen35Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset '{name}'; known presets: {', '.join(PRESETS)}") from None


_TEXT_FIELDS = [
    f.name for f in dataclasses.fields(Qwen35Config) if f.name not in ("layer_types", "vision")
]


def from_hf_dict(raw: dict[str, Any]) -> Qwen35Config:
    """Build a config from a parsed Hugging Face ``config.json``."""
    if not isinstance(raw, dict):
        raise ConfigError("config.json must hold a JSON object")
    model_type = raw.get("model_type")
    if model_type == "qwen3_5":
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(
                "config field 'text_config' is missing: a 'qwen3_5' config nests the decoder there"
            )
        vision = raw.get("vision_config")
        vision = None if vision is None else VisionConfig.from_json(vision)
        # transformers ties the head by the top-level flag of the wrapper.
        tie = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    elif model_type == "qwen3_5_text":
        text, vision = raw, None
        tie = text.get("tie_word_embeddings", False)
    else:
        raise ConfigError(
            f"config field 'model_type' is {model_type!r}; expected 'qwen3_5' or 'qwen3_5_text'"
        )

    fields: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        if name in text:
            fields[name] = text[name]
    rope = text.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ConfigError("config field 'rope_parameters' must be an object")
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(
            f"config field 'rope_parameters.rope_type' is {rope.get('rope_type')!r}; only 'default' is supported"
        )
    # transformers falls back to theta 1e4 when rope_parameters is missing.
    fields["rope_theta"] = float(rope.get("rope_theta", text.get("rope_theta", 10000.0)))
    fields["partial_rotary_factor"] = float(
        rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
    )
    fields["tie_word_embeddings"] = bool(tie)
    if "num_hidden_layers" not in text:
        raise ConfigError("config field 'num_hidden_layers' is missing")
    required = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
    ]
    for name in required:
        if name not in text:
            raise ConfigError(f"config field '{name}' is missing")
    defaults = dict(
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
    )
    for name, value in defaults.items():
        fields.setdefault(name, value)
    layer_types = text.get("layer_types")
    if layer_types is None:
        layer_types = default_layer_types(
            text["num_hidden_layers"], text.get("full_attention_interval", 4)
        )
    if not isinstance(layer_types, (list, tuple)):
        raise ConfigError("config field 'layer_types' must be a list")
    fields["layer_types"] = tuple(layer_types)
    fields["vision"] = vision
    try:
        return Qwen35Config(**fields)
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(f"config.json: {e}") from None


def load_config(path: str | Path) -> Qwen35Config:
    """Load ``config.json`` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise ConfigError(
            f"{file}: no such file (expected a Hugging Face checkpoint directory with config.json)"
        )
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    try:
        return from_hf_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def resolve_model(spec: str) -> tuple[Qwen35Config, Path | None]:
    """A preset name or a checkpoint directory -> (config, checkpoint dir or None)."""
    if spec in PRESETS:
        return PRESETS[spec], None
    path = Path(spec)
    if path.exists():
        return load_config(path), (path if path.is_dir() else path.parent)
    raise ConfigError(
        f"'{spec}' is neither a preset ({', '.join(PRESETS)}) nor an existing checkpoint directory"
    )
