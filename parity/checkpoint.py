"""Random-weight Qwen3.5 checkpoints in the real Hugging Face layout.

:func:`write_checkpoint` writes what a published ``Qwen3_5ForConditionalGeneration``
checkpoint holds: ``config.json``, ``generation_config.json``, safetensors
(one file, or shards with an index) and the tokenizer files.  The tensors are
``model.language_model.*`` (the text decoder), ``model.visual.*`` (the vision
tower), ``mtp.*`` (the multi-token-prediction head, which transformers ignores
on load) and ``lm_head.weight`` for untied models only.  No torch: numpy,
``safetensors.numpy`` and ``ml_dtypes`` for bfloat16.

The values are random but shaped like a trained model's, so that a compiled
model has something to get wrong:

* linear weights ~ N(0, 1/fan_in); the projections that write back into the
  residual stream (``o_proj``, ``out_proj``, ``down_proj``) are scaled by
  4/sqrt(num_layers), so the stream ends near RMS 3 at any depth;
* the embedding (and an untied ``lm_head``) ~ N(0, (4/sqrt(hidden))^2), so
  logits have a standard deviation near 4: neither flat nor one-hot, and the
  top-1 margin varies from position to position.  The layers' writes outweigh
  the embedding in the final residual, so a tied head does not just echo the
  input token;
* every zero-centred RMSNorm weight ~ N(0, 0.1), so the ``1 + w`` path is
  exercised; the gated RMSNorm of the linear-attention layers ~ 1 + N(0, 0.1);
* ``A_log`` = log(U(1, 16)) and ``dt_bias`` = softplus^-1(dt), dt ~ logU(1e-3, 0.1)
  (the Mamba/FLA initialisation): per-token decays exp(g) of about 0.2-0.999,
  so the DeltaNet state accumulates over many tokens.  (With fast-forgetting
  decays the DeltaNet output is tiny, and its RMSNormGated amplifies fp32
  rounding by 1000x: the reference itself then drifts 1e-4 from fp64.)
* vision LayerNorms ~ 1 + N(0, 0.1) with N(0, 0.1) biases, linear biases
  ~ N(0, 0.1), the learned position table ~ N(0, 0.5^2).

Each tensor is drawn from its own stream, seeded by ``seed`` and the tensor's
name, so the values do not depend on sharding or on writing order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from ..compile import tokenizer
from ..compile.config import (
    ENDOFTEXT_ID,
    FULL,
    STOP_TOKEN_IDS,
    ImageProcessorConfig,
    Qwen35Config,
    VisionConfig,
    preset,
)

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
ENSURE_SHARD_BYTES = 2 << 30  # ensure_checkpoint shards the real sizes to bound memory
_FORMAT_VERSION = 2  # bump when the files written for a given seed change (2: preprocessor)
_LOGIT_STD = 4.0  # std of the logits a tied head produces
_RESIDUAL_GAIN = (
    4.0  # residual-branch output projections: _RESIDUAL_GAIN / sqrt(num_layers) / sqrt(fan_in)
)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: its shape and how to draw it.

    ``kind`` is ``"normal"`` (N(0, std^2)), ``"one_plus"`` (1 + N(0, std^2)),
    ``"a_log"`` (log U(1, 16)) or ``"dt_bias"`` (softplus^-1 of logU(1e-3, 0.1))."""

    shape: tuple[int, ...]
    kind: str = "normal"
    std: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _linear(out_features: int, in_features: int, scale: float = 1.0) -> TensorSpec:
    return TensorSpec((out_features, in_features), std=scale / math.sqrt(in_features))


def _rms_norm(dim: int) -> TensorSpec:  # zero-centred: the model multiplies by 1 + w
    return TensorSpec((dim,), std=0.1)


def _bias(dim: int) -> TensorSpec:
    return TensorSpec((dim,), std=0.1)


def _layer_norm(prefix: str, dim: int) -> dict[str, TensorSpec]:
    return {f"{prefix}.weight": TensorSpec((dim,), "one_plus", 0.1), f"{prefix}.bias": _bias(dim)}


def _decoder_layer(config: Qwen35Config, layer_type: str) -> dict[str, TensorSpec]:
    """One text decoder layer, names relative to the layer."""
    h = config.hidden_size
    out_scale = _RESIDUAL_GAIN / math.sqrt(config.num_hidden_layers)
    specs = {
        "input_layernorm.weight": _rms_norm(h),
        "post_attention_layernorm.weight": _rms_norm(h),
    }
    if layer_type == FULL:
        heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        specs.update(
            {
                "self_attn.q_proj.weight": _linear(
                    heads * d * 2, h
                ),  # per head: [query | output gate]
                "self_attn.k_proj.weight": _linear(kv_heads * d, h),
                "self_attn.v_proj.weight": _linear(kv_heads * d, h),
                "self_attn.o_proj.weight": _linear(h, heads * d, out_scale),
                "self_attn.q_norm.weight": _rms_norm(d),
                "self_attn.k_norm.weight": _rms_norm(d),
            }
        )
    else:
        hv, k = config.linear_num_value_heads, config.linear_conv_kernel_dim
        specs.update(
            {
                "linear_attn.in_proj_qkv.weight": _linear(config.conv_dim, h),
                "linear_attn.in_proj_z.weight": _linear(config.linear_value_dim, h),
                "linear_attn.in_proj_b.weight": _linear(hv, h),
                "linear_attn.in_proj_a.weight": _linear(hv, h),
                "linear_attn.conv1d.weight": TensorSpec(
                    (config.conv_dim, 1, k), std=1 / math.sqrt(k)
                ),
                "linear_attn.dt_bias": TensorSpec((hv,), "dt_bias"),
                "linear_attn.A_log": TensorSpec((hv,), "a_log"),
                "linear_attn.norm.weight": TensorSpec(
                    (config.linear_value_head_dim,), "one_plus", 0.1
                ),
                "linear_attn.out_proj.weight": _linear(h, config.linear_value_dim, out_scale),
            }
        )
    i = config.intermediate_size
    specs.update(
        {
            "mlp.gate_proj.weight": _linear(i, h),
            "mlp.up_proj.weight": _linear(i, h),
            "mlp.down_proj.weight": _linear(h, i, out_scale),
        }
    )
    return specs


def _vision_tower(v: VisionConfig) -> dict[str, TensorSpec]:
    """``Qwen3_5VisionModel``'s parameters, names relative to ``model.visual``."""
    h, inter = v.hidden_size, v.intermediate_size
    patch = (v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    merged = h * v.spatial_merge_size**2
    specs = {
        "patch_embed.proj.weight": TensorSpec((h, *patch), std=1 / math.sqrt(math.prod(patch))),
        "patch_embed.proj.bias": _bias(h),
        "pos_embed.weight": TensorSpec((v.num_position_embeddings, h), std=0.5),
    }
    for b in range(v.depth):
        block = {
            **_layer_norm("norm1", h),
            **_layer_norm("norm2", h),
            "attn.qkv.weight": _linear(3 * h, h),
            "attn.qkv.bias": _bias(3 * h),
            "attn.proj.weight": _linear(h, h),
            "attn.proj.bias": _bias(h),
            "mlp.linear_fc1.weight": _linear(inter, h),
            "mlp.linear_fc1.bias": _bias(inter),
            "mlp.linear_fc2.weight": _linear(h, inter),
            "mlp.linear_fc2.bias": _bias(h),
        }
        specs.update({f"blocks.{b}.{name}": spec for name, spec in block.items()})
    specs.update(
        {
            **_layer_norm("merger.norm", h),
            "merger.linear_fc1.weight": _linear(merged, merged),
            "merger.linear_fc1.bias": _bias(merged),
            "merger.linear_fc2.weight": _linear(v.out_hidden_size, merged),
            "merger.linear_fc2.bias": _bias(v.out_hidden_size),
        }
    )
    return specs


def tensor_specs(config: Qwen35Config) -> dict[str, TensorSpec]:
    """Every tensor of the checkpoint, by its Hugging Face name, in file order."""
    if config.vision is None:
        raise ValueError("write_checkpoint writes the multimodal layout and needs config.vision")
    h, vocab = config.hidden_size, config.vocab_size
    embedding = TensorSpec((vocab, h), std=_LOGIT_STD / math.sqrt(h))
    specs = {"model.language_model.embed_tokens.weight": embedding}
    for i, layer_type in enumerate(config.layer_types):
        specs.update(
            {
                f"model.language_model.layers.{i}.{n}": s
                for n, s in _decoder_layer(config, layer_type).items()
            }
        )
    specs["model.language_model.norm.weight"] = _rms_norm(h)
    specs.update({f"model.visual.{n}": s for n, s in _vision_tower(config.vision).items()})
    if not config.tie_word_embeddings:
        specs["lm_head.weight"] = embedding
    if config.mtp_num_hidden_layers:
        # The MTP head of the published checkpoints (vLLM's Qwen3_5MultiTokenPredictor):
        # fc(concat(norm_e(embed(next token)), norm_h(hidden))) -> full-attention layer(s) -> norm.
        specs["mtp.fc.weight"] = _linear(h, 2 * h)
        specs["mtp.pre_fc_norm_embedding.weight"] = _rms_norm(h)
        specs["mtp.pre_fc_norm_hidden.weight"] = _rms_norm(h)
        for j in range(config.mtp_num_hidden_layers):
            specs.update(
                {f"mtp.layers.{j}.{n}": s for n, s in _decoder_layer(config, FULL).items()}
            )
        specs["mtp.norm.weight"] = _rms_norm(h)
    return specs


def _draw(name: str, spec: TensorSpec, seed: int) -> np.ndarray:
    """The float32 values of one tensor: a stream of its own, keyed by seed and name."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key,)))
    if spec.kind == "a_log":
        return np.log(rng.uniform(1.0, 16.0, spec.shape)).astype(np.float32)
    if spec.kind == "dt_bias":
        # Mamba/FLA initialisation: dt ~ logU(1e-3, 1e-1), dt_bias = softplus^-1(dt)
        dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), spec.shape))
        return (dt + np.log(-np.expm1(-dt))).astype(np.float32)
    values = rng.standard_normal(spec.shape, dtype=np.float32)
    values *= np.float32(spec.std)
    if spec.kind == "one_plus":
        values += np.float32(1.0)
    return values


def _plan_shards(
    specs: dict[str, TensorSpec], itemsize: int, max_shard_bytes: int | None
) -> list[list[str]]:
    """Tensor names per file, in order; a tensor larger than the limit gets a file of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        nbytes = spec.numel * itemsize
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def write_checkpoint(
    config: Qwen35Config,
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_bytes: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a random-weight ``Qwen3_5ForConditionalGeneration`` checkpoint to ``out_dir``.

    ``dtype`` is ``"float32"``, ``"bfloat16"`` or ``"float16"`` (every tensor).
    With ``max_shard_bytes``, tensors are split into
    ``model-0000N-of-0000M.safetensors`` plus ``model.safetensors.index.json``;
    as in ``save_pretrained``, a checkpoint that fits in one shard is still
    written as a single ``model.safetensors``.  ``progress(done, total)`` is
    called after each tensor with the bytes written so far.

    The directory appears complete or not at all: everything is written into a
    temporary sibling that is renamed at the end.  ``out_dir`` must not exist
    or be empty (FileExistsError otherwise).  Deterministic for a given seed.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    np_dtype = np.dtype(DTYPES[dtype])
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory")
    specs = tensor_specs(config)
    shards = _plan_shards(specs, np_dtype.itemsize, max_shard_bytes)
    total = sum(spec.numel for spec in specs.values()) * np_dtype.itemsize

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        hf_config = {**config.hf_config_dict(), "dtype": dtype, "torch_dtype": dtype}
        _json(tmp / "config.json", hf_config)
        _json(
            tmp / "generation_config.json",
            {
                "bos_token_id": ENDOFTEXT_ID,
                "eos_token_id": list(STOP_TOKEN_IDS),
                "pad_token_id": ENDOFTEXT_ID,
            },
        )
        tokenizer.write_tokenizer_files(tmp)
        if config.vision is not None:  # the image processor (Qwen3-VL's published values)
            _json(tmp / ImageProcessorConfig.FILE, ImageProcessorConfig().to_hf())
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        )
        done = 0
        for file_name, shard in zip(names, shards):
            tensors = {}
            for name in shard:
                tensors[name] = _draw(name, specs[name], seed).astype(np_dtype, copy=False)
                done += tensors[name].nbytes
                if progress is not None:
                    progress(done, total)
            save_file(tensors, tmp / file_name, metadata={"format": "pt"})
            del tensors
        if len(shards) > 1:
            weight_map = {
                name: file_name for file_name, shard in zip(names, shards) for name in shard
            }
            _json(
                tmp / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map},
            )
        try:
            os.rename(tmp, out_dir)
        except OSError as e:  # out_dir appeared meanwhile (another writer)
            raise FileExistsError(
                f"{out_dir} appeared while the checkpoint was being written"
            ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def ensure_checkpoint(
    preset_name: str, cache_root: str | Path | None = None, *, seed: int = 0, dtype: str = "float32"
) -> Path:
    """The checkpoint of a preset, written on first use under
    ``cache_root/checkpoints/`` (default: the package cache,
    ``$QWEN35_MOBILE_CACHE`` or ``~/.cache/qwen35_mobile``) and reused after,
    keyed by preset, seed and dtype.  Safe against concurrent first uses."""
    config = preset(preset_name)
    root = Path(cache_root) if cache_root is not None else tokenizer.cache_root()
    path = root / "checkpoints" / f"{preset_name}-seed{seed}-{dtype}-v{_FORMAT_VERSION}"
    if path.exists():
        return path
    try:
        return write_checkpoint(
            config, path, seed=seed, dtype=dtype, max_shard_bytes=ENSURE_SHARD_BYTES
        )
    except FileExistsError:
        if (path / "config.json").exists():  # another process finished first
            return path
        raise
