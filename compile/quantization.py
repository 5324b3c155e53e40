"""MLC-compatible group quantization: ``q4f16_1`` and ``q4f32_1``.

Layout (that of MLC-LLM's ``GroupQuantize`` with ``linear_weight_layout="NK"``,
``quantize_dtype="int4"``, ``storage_dtype="uint32"``, ``group_size=32``):

* A weight ``W [N, K]`` (``N`` outputs, ``K`` inputs; an embedding table is
  ``[vocab, hidden]``, grouped along ``hidden``) is split into groups of 32
  consecutive elements along ``K``.  ``G = ceil(K / 32)`` groups per row.
* ``scale[n, g] = max|W[n, 32g : 32g+32]| / 7``, stored in the model dtype
  (float16 for q4f16_1, float32 for q4f32_1): ``scale`` has shape ``[N, G]``.
* ``q = clip(round(W / scale + 7), 0, 14)`` (MLC clips at ``2 * 7``; with
  ``|W| <= 7 scale`` the value 15 is never produced), computed in the model
  dtype (the weight is first cast to it, as MLC's loader does), rounding half
  to even.  A group of zeros (scale 0) stores ``q = 7``.
* Eight 4-bit values per ``uint32``, the lowest nibble first:
  ``packed[n, j] = sum_{i<8} q[n, 8j + i] << 4i``.  ``packed`` is
  ``[N, 4 G]`` (``= [N, K / 8]`` when 32 divides ``K``).
* Dequantization, with MLC's values:
  ``W'[n, k] = (float(q[n, k]) - 7) * scale[n, k // 32]`` rounded to the model
  dtype.  The kernels compute it in fp32 and round once to fp16 (for q4f16_1),
  which gives MLC's fp16 arithmetic bit for bit (``q - 7`` times an fp16 scale
  is exact in fp32); the matmul then accumulates ``x * W'`` in fp32.

**K not divisible by 32**: the last group is padded.  Its scale is the max over
the real elements only; the padding nibbles are stored as 0 (what MLC's
``pack_weight`` writes) and are never read: dequantization produces exactly
``K`` columns.  ``packed`` then has ``4 * ceil(K / 32)`` words per row.

The numpy functions work on one tensor at a time, ``ROW_CHUNK`` rows at a time,
so a converter can stream a checkpoint (peak extra memory: the outputs plus a
few chunk-sized temporaries).

The ``nn`` modules (:class:`QuantizedLinear`, :class:`QuantizedEmbedding`)
express dequantization as a TE compute named ``dequantize`` feeding
``op.matmul``; Relax ``FuseOps``/``FuseTIR`` (run by ``cpu_pipeline``) fuse it
into the matmul: one PrimFunc reads the packed weight and the scales and
accumulates in fp32.  :func:`quantize_model` swaps them in for every
``nn.Linear`` / ``nn.Embedding`` of a model and records how each original
parameter maps to the quantized ones (:class:`QuantizeMap`).

Parameter names: a quantized layer ``X`` holds ``X.weight`` (packed uint32)
and ``X.scale``.  (MLC names them ``X.q_weight`` / ``X.q_scale``; the bytes
are the same.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

__all__ = [
    "FORMATS",
    "GROUP_SIZE",
    "QuantFormat",
    "QuantizeMap",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "dequantize_weight",
    "fake_quantize",
    "get_format",
    "packed_shape",
    "quantize_model",
    "quantize_weight",
    "quantized_nbytes",
    "scale_shape",
]

GROUP_SIZE = 32
BITS = 4
ELEMS_PER_WORD = 32 // BITS  # 8 nibbles per uint32
WORDS_PER_GROUP = GROUP_SIZE // ELEMS_PER_WORD  # 4
MAX_INT = 2 ** (BITS - 1) - 1  # 7: the zero point
MAX_Q = 2 * MAX_INT  # 14: MLC's clip bound
STORAGE_DTYPE = "uint32"
ROW_CHUNK = 4096  # rows quantized per numpy step (bounds the temporaries)


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """One group-quantization format: its name and its model (= scale) dtype."""

    name: str
    model_dtype: str  # dtype of the scales, of the dequantized weight and of activations

    @property
    def scale_dtype(self) -> str:
        return self.model_dtype


FORMATS: dict[str, QuantFormat] = {
    "q4f16_1": QuantFormat("q4f16_1", "float16"),
    "q4f32_1": QuantFormat("q4f32_1", "float32"),
}


def get_format(fmt: str | QuantFormat) -> QuantFormat:
    if isinstance(fmt, QuantFormat):
        return fmt
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown group quantization {fmt!r}; known: {', '.join(FORMATS)}") from None


def num_groups(k: int) -> int:
    return -(-int(k) // GROUP_SIZE)


def packed_shape(n: int, k: int) -> tuple[int, int]:
    """Shape of the packed uint32 weight of an ``[n, k]`` tensor."""
    return (int(n), num_groups(k) * WORDS_PER_GROUP)


def scale_shape(n: int, k: int) -> tuple[int, int]:
    """Shape of the scales of an ``[n, k]`` tensor."""
    return (int(n), num_groups(k))


# ---------------------------------------------------------------------------
# numpy
# ---------------------------------------------------------------------------
_SHIFTS = (np.arange(ELEMS_PER_WORD, dtype=np.uint32) * BITS).astype(np.uint32)


def _quantize_rows(w: np.ndarray, dtype: np.dtype, k_pad: int) -> tuple[np.ndarray, np.ndarray]:
    rows, k = w.shape
    src = w
    with np.errstate(over="ignore"):
        w = w.astype(dtype, copy=False)
    if w is not src and np.count_nonzero(np.isinf(w)) > np.count_nonzero(np.isinf(src)):
        peak = float(np.max(np.abs(src.astype(np.float32))))
        raise OverflowError(f"values beyond the {dtype} range (max |w| = {peak:g})")
    if not np.all(np.isfinite(w)):
        raise ValueError("weight holds inf or nan")
    if k_pad != k:
        w = np.concatenate([w, np.zeros((rows, k_pad - k), dtype)], axis=1)
    # MLC's arithmetic is in the model dtype.  For fp16 it is done here in fp32,
    # rounding to fp16 after each operation: with 24 >= 2 * 11 + 2 bits, that
    # double rounding equals fp16 arithmetic exactly (and is ~3x faster than
    # numpy's fp16 loops).
    f32 = np.float32
    rnd = (lambda a: a) if dtype == f32 else (lambda a: a.astype(dtype).astype(f32))
    groups = w.astype(f32, copy=False).reshape(rows, k_pad // GROUP_SIZE, GROUP_SIZE)
    max_abs = np.abs(groups).max(axis=-1)
    scale = rnd(max_abs / f32(MAX_INT))
    safe = np.where(scale == 0, f32(1), scale)  # a zero group: q = 7
    q = np.round(rnd(rnd(groups / safe[..., None]) + f32(MAX_INT)))
    scale = scale.astype(dtype)
    q = np.clip(q, 0, MAX_Q).astype(np.uint32).reshape(rows, k_pad)
    if k_pad != k:
        q[:, k:] = 0  # MLC's pack_weight writes 0 past K
    words = q.reshape(rows, k_pad // ELEMS_PER_WORD, ELEMS_PER_WORD) << _SHIFTS
    packed = np.bitwise_or.reduce(words, axis=-1).astype(np.uint32)
    return packed, scale


def quantize_weight(w: np.ndarray, fmt: str | QuantFormat) -> tuple[np.ndarray, np.ndarray]:
    """Group-quantize ``w [N, K]`` (any float dtype, bf16 included).

    Returns ``(packed uint32 [N, 4 ceil(K/32)], scale [N, ceil(K/32)])``; the
    scale has the format's model dtype.  Works ``ROW_CHUNK`` rows at a time,
    casting each chunk to the model dtype (pass the checkpoint's bf16/fp16/fp32
    array as it is: no full-size cast copy is made).  Raises OverflowError when
    a value does not fit the model dtype (fp16), ValueError on inf/nan.
    """
    f = get_format(fmt)
    if w.ndim != 2:
        raise ValueError(f"quantize_weight expects a 2-D [N, K] tensor, got shape {w.shape}")
    n, k = w.shape
    dtype = np.dtype(f.model_dtype)
    k_pad = num_groups(k) * GROUP_SIZE
    packed = np.empty(packed_shape(n, k), np.uint32)
    scale = np.empty(scale_shape(n, k), dtype)
    for start in range(0, n, ROW_CHUNK):
        stop = min(n, start + ROW_CHUNK)
        packed[start:stop], scale[start:stop] = _quantize_rows(w[start:stop], dtype, k_pad)
    return packed, scale


def dequantize_weight(
    packed: np.ndarray, scale: np.ndarray, fmt: str | QuantFormat, k: int | None = None
) -> np.ndarray:
    """The float32 ``[N, K]`` weight that the kernels compute with.

    ``k`` is the original input size (default: ``8 * packed.shape[1]``, right
    when 32 divides K).  The product ``(q - 7) * scale`` is rounded to the model
    dtype first, exactly as the compiled dequantization does.
    """
    f = get_format(fmt)
    dtype = np.dtype(f.model_dtype)
    n, words = packed.shape
    k_pad = words * ELEMS_PER_WORD
    k = k_pad if k is None else int(k)
    if scale.shape != (n, words // WORDS_PER_GROUP) or not k_pad - GROUP_SIZE < k <= k_pad:
        raise ValueError(f"packed {packed.shape} / scale {scale.shape} do not describe K={k}")
    out = np.empty((n, k), np.float32)
    for start in range(0, n, ROW_CHUNK):
        stop = min(n, start + ROW_CHUNK)
        q = (packed[start:stop, :, None] >> _SHIFTS) & np.uint32(0xF)
        q = q.reshape(stop - start, k_pad)[:, :k].astype(dtype) - dtype.type(MAX_INT)
        s = np.repeat(scale[start:stop].astype(dtype), GROUP_SIZE, axis=1)[:, :k]
        out[start:stop] = (q * s).astype(dtype)
    return out


def fake_quantize(w: np.ndarray, fmt: str | QuantFormat) -> np.ndarray:
    """``dequantize(quantize(w))`` as float32 ``[N, K]``: the weights a reference
    (transformers) must run with to match the quantized kernels.  For q4f16_1
    the values are exactly representable in fp16."""
    packed, scale = quantize_weight(w, fmt)
    return dequantize_weight(packed, scale, fmt, k=w.shape[1])


# ---------------------------------------------------------------------------
# TVM nn modules
# ---------------------------------------------------------------------------
def _dequant_value(word, scale, k, dtype: str):
    """``(q - 7) * scale`` for column ``k``, given its packed word and its scale (TIR).

    The value is MLC's (``float(q) - 7`` times the scale, rounded to ``dtype``),
    computed in fp32 and rounded once: ``q - 7`` and its product with an fp16
    scale are exact in fp32, so one rounding to fp16 equals MLC's fp16
    arithmetic bit for bit, without fp16 arithmetic (which CPUs without native
    fp16 emulate by a convert per operation; measured 2x faster on x86).
    """
    shift = ((k % ELEMS_PER_WORD) * BITS).astype(STORAGE_DTYPE)
    nibble = tirx.bitwise_and(tirx.shift_right(word, shift), tirx.const((1 << BITS) - 1, STORAGE_DTYPE))
    value = (nibble.astype("float32") - tirx.const(MAX_INT, "float32")) * scale.astype("float32")
    return value if dtype == "float32" else value.astype(dtype)


def dequantize_te(weight, scale, n, k: int, dtype: str):
    """TE compute ``[n, k]``: the dequantized weight (the fused kernel's producer)."""
    return te.compute(
        (n, k),
        lambda i, j: _dequant_value(weight[i, j // ELEMS_PER_WORD], scale[i, j // GROUP_SIZE], j, dtype),
        name="dequantize",
    )


def dequantize_matmul_te(x, weight, scale, n: int, k: int, dtype: str):
    """TE ``out[..., j] = sum_k f32(x[..., k]) * f32(dequant(W)[j, k])``: one PrimFunc
    of two blocks, ``dequantize`` (injective, inlined by any schedule) and
    ``NT_matmul`` (the fp32 reduction)."""
    # int64 extents, like the other axes: a mixed int32 reduction axis makes the
    # CPU matmul schedule miss this function (6x slower prefill).
    n, k = tirx.IntImm("int64", n), tirx.IntImm("int64", k)
    w = dequantize_te(weight, scale, n, k, dtype)
    r = te.reduce_axis((tirx.IntImm("int64", 0), k), name="k")
    return te.compute(
        (*x.shape[:-1], n),
        lambda *i: te.sum(x[(*i[:-1], r)].astype("float32") * w[i[-1], r].astype("float32"), axis=r),
        name="NT_matmul",
    )


class _Quantized(nn.Module):
    """``weight`` (packed uint32) and ``scale`` parameters of an ``[n, k]`` tensor."""

    def _make_params(self, n: int, k: int, fmt: QuantFormat) -> None:
        self.fmt = fmt
        self.weight = nn.Parameter(packed_shape(n, k), STORAGE_DTYPE)
        self.scale = nn.Parameter(scale_shape(n, k), fmt.scale_dtype)

    def _matmul(self, x, n: int, k: int):
        """``x @ dequant(W)^T`` in fp32 as ONE TE function (dequantization fused).

        Expressed as a single TE compute rather than ``op.matmul`` of a
        dequantized tensor: Relax ``FuseOps`` does not fuse an injective producer
        into a matmul (MLC needs its own ``FuseDequantizeMatmulEwise`` pass for
        that), so the fusion is made here, for every target and pipeline.
        """
        dtype = self.fmt.model_dtype
        return op.tensor_expr_op(
            lambda a, w, s: dequantize_matmul_te(a, w, s, n, k, dtype),
            "dequantize_NT_matmul",
            [x, self.weight, self.scale],
        )


class QuantizedLinear(_Quantized):
    """``y = x @ dequant(W)^T`` (no bias), accumulated in fp32, returned in ``out_dtype``.

    ``x`` normally has the format's model dtype (any float dtype works: it is
    read as fp32).  Dequantization and matmul are one PrimFunc
    (``dequantize_NT_matmul``); an output cast fuses into it under ``FuseOps``.
    """

    def __init__(self, in_features: int, out_features: int, fmt: str | QuantFormat, out_dtype: str | None = None):
        f = get_format(fmt)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.out_dtype = out_dtype or f.model_dtype
        self._make_params(self.out_features, self.in_features, f)

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedLinear: input has {x.shape[-1]} features, expected {self.in_features}")
        y = self._matmul(x, self.out_features, self.in_features)
        return y if self.out_dtype == "float32" else y.astype(self.out_dtype)


class QuantizedEmbedding(_Quantized):
    """Embedding table ``[vocab, hidden]`` quantized along ``hidden``.

    ``forward(ids)`` gathers the packed rows and scales of ``ids`` and
    dequantizes only those (one TE function, ``dequantize_take``);
    ``lm_head_forward(x)`` is the tied head ``x @ dequant(table)^T`` in fp32,
    dequantization fused into the matmul.
    """

    def __init__(self, num: int, dim: int, fmt: str | QuantFormat):
        f = get_format(fmt)
        self.num, self.dim = int(num), int(dim)
        self._make_params(self.num, self.dim, f)

    def forward(self, ids):
        dtype, dim = self.fmt.model_dtype, self.dim

        def gather(idx, w, s):
            return te.compute(
                (idx.shape[0], dim),
                lambda i, j: _dequant_value(w[idx[i], j // ELEMS_PER_WORD], s[idx[i], j // GROUP_SIZE], j, dtype),
                name="dequantize_take",
            )

        flat = ids if ids.ndim == 1 else op.reshape(ids, [-1])
        out = op.tensor_expr_op(gather, "dequantize_take", [flat, self.weight, self.scale])
        return out if ids.ndim == 1 else op.reshape(out, [*ids.shape, dim])

    def lm_head_forward(self, x):
        """Logits ``x @ dequant(table)^T``, fp32."""
        return self._matmul(x, self.num, self.dim)


# ---------------------------------------------------------------------------
# Model rewriting
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class QuantizeMap:
    """How a quantized model's parameters derive from the original ones.

    ``param_map``: original name -> ``[packed name, scale name]`` for every
    quantized tensor; parameters not listed are unchanged (same name, shape and
    dtype as before quantization).
    """

    fmt: QuantFormat
    param_map: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # original [N, K]

    def sources(
        self, expected: list[tuple[str, tuple[int, ...], str]] | dict[str, tuple[tuple[int, ...], str]]
    ) -> list[tuple[str, tuple[int, ...], str, list[str]]]:
        """A converter's plan from the exported parameter list (``Exported.params``
        or ``Exported.expected()``), in its order: ``(original name, original
        shape, dtype to cast to, names written)``.  A quantized tensor appears
        once, where its packed weight is, cast to the model dtype, writing
        ``[X.weight, X.scale]`` (the export lists them consecutively); the others
        map to themselves.  Raises ValueError if the list does not fit the map.
        """
        if isinstance(expected, dict):
            items = [(n, tuple(int(d) for d in v[0]), str(v[1])) for n, v in expected.items()]
        else:
            items = [(n, tuple(int(d) for d in s), str(d)) for n, s, d in expected]
        by_name = {n: (s, d) for n, s, d in items}
        source = self.source_of()
        plan = []
        for name, shape, dtype in items:
            orig = source.get(name)
            if orig is None:
                plan.append((name, tuple(shape), dtype, [name]))
                continue
            packed_name, scale_name = self.param_map[orig]
            if name == scale_name:
                continue
            n, k = self.shapes[orig]
            want = {packed_name: (packed_shape(n, k), STORAGE_DTYPE), scale_name: (scale_shape(n, k), self.fmt.scale_dtype)}
            got = {q: by_name.get(q) for q in want}
            if got != want:
                raise ValueError(f"parameters of quantized '{orig}' are {got}, expected {want}")
            plan.append((orig, (n, k), self.fmt.model_dtype, [packed_name, scale_name]))
        return plan

    def source_of(self) -> dict[str, str]:
        """Quantized parameter name -> original parameter name."""
        return {q: orig for orig, names in self.param_map.items() for q in names}

    def convert(self, name: str, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """The tensors to store for original parameter ``name``: ``[(packed name,
        packed), (scale name, scale)]`` when it is quantized, else ``[(name, array)]``."""
        names = self.param_map.get(name)
        if names is None:
            return [(name, array)]
        packed, scale = quantize_weight(array, self.fmt)
        return [(names[0], packed), (names[1], scale)]


def quantize_model(model, fmt: str | QuantFormat, name_prefix: str = ""):
    """Replace every ``nn.Linear`` and ``nn.Embedding`` of ``model`` (in place)
    by :class:`QuantizedLinear` / :class:`QuantizedEmbedding`; returns the model.

    The model must have been built in the format's model dtype.  A Linear's
    output dtype is kept: the project's ``Linear`` (``compile/model/qwen35.py``)
    returns ``.out`` (fp32 for residual projections, else the model dtype);
    a plain ``nn.Linear`` its ``out_dtype`` (or its weight dtype).  Biases are
    refused (Qwen3.5 has none).  Other parameters (``A_log``, ``dt_bias``,
    norm and conv weights) are untouched.  A module with attribute
    ``no_quantization = True`` is left whole.  The name map is stored as
    ``model.quantize_map`` (:class:`QuantizeMap`).
    """
    f = get_format(fmt)
    qmap = QuantizeMap(f)

    def check_dtype(name: str, param) -> None:
        if param.dtype != f.model_dtype:
            raise ValueError(
                f"{name}.weight is {param.dtype}, but {f.name} needs a model built in {f.model_dtype}"
            )

    class _Mutator(nn.Mutator):
        def visit_module(self, name: str, node: Any) -> Any:
            if getattr(node, "no_quantization", False):
                return node
            if isinstance(node, nn.Linear):
                if getattr(node, "bias", None) is not None:
                    raise ValueError(f"{name}: Linear with a bias is not supported by quantize_model")
                check_dtype(name, node.weight)
                out = getattr(node, "out", None) or node.out_dtype or node.weight.dtype
                qmap.param_map[f"{name}.weight"] = [f"{name}.weight", f"{name}.scale"]
                qmap.shapes[f"{name}.weight"] = (int(node.out_features), int(node.in_features))
                return QuantizedLinear(node.in_features, node.out_features, f, out)
            if isinstance(node, nn.Embedding):
                check_dtype(name, node.weight)
                num, dim = (int(d) for d in node.weight.shape)
                qmap.param_map[f"{name}.weight"] = [f"{name}.weight", f"{name}.scale"]
                qmap.shapes[f"{name}.weight"] = (num, dim)
                return QuantizedEmbedding(num, dim, f)
            return self.visit(name, node)

    model = _Mutator().visit(name_prefix, model)
    model.quantize_map = qmap
    return model


def quantized_nbytes(shape: tuple[int, ...], fmt: str | QuantFormat) -> int:
    """Bytes stored for a quantized ``[N, K]`` tensor (packed + scales)."""
    f = get_format(fmt)
    n, k = shape
    return math.prod(packed_shape(n, k)) * 4 + math.prod(scale_shape(n, k)) * np.dtype(f.scale_dtype).itemsize
