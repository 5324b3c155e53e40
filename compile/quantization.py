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

The Relax side (``nn`` modules that dequantize inside their matmul, and
``quantize_model``, the rewrite of a model) is ``compile/model/quantized.py``;
this module imports no TVM, so that the command line can read the registry.

:data:`QUANTIZATIONS` is the one registry of ``--quant`` values
(:class:`Quantization`: ``q0f32``, ``q0f16``, ``q4f16_1``, ``q4f32_1``, and
``q4f16_i8``: ``q4f16_1``'s weights with int8 activations in the CPU decode GEMVs): the
model dtype, which parameters stay unquantized (:meth:`~Quantization.keeps`),
every parameter's stored dtype and shape, the conversion of a checkpoint
tensor, the values the parity reference runs with, and the model rewrite
(:meth:`~Quantization.quantize`).  Export (``compile/pipeline.py``), weight
conversion (``compile/weights.py``), sizes, the parity reference and the CLI
read it and nothing else.

Parameter names: a quantized layer ``X`` holds ``X.weight`` (packed uint32)
and ``X.scale``.  (MLC names them ``X.q_weight`` / ``X.q_scale``; the bytes
are the same.)
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..errors import UserError

__all__ = [
    "GROUP_SIZE",
    "QUANTIZATIONS",
    "Quantization",
    "QuantizeMap",
    "dequantize_weight",
    "fake_quantize",
    "get",
    "grouped",
    "packed_shape",
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


# Parameters stored in float32 whatever the model dtype: the reference computes
# the DeltaNet decay in fp32 (docs/design.md).  Norms are stored in the model
# dtype and compute in fp32.
FP32_PARAMS = ("A_log", "dt_bias")
# The vision tower's parameters (compile/model/vision.py): never group-quantized;
# q4 builds keep them in the model dtype, like the norms.
VISION_PREFIX = "visual."


@dataclasses.dataclass(frozen=True)
class Quantization:
    """One ``--quant`` value and everything that follows from it: the model
    dtype, which parameters are group-quantized and how, the dtype of every
    other parameter, what a checkpoint tensor converts to, and what the parity
    reference must run with.  :data:`QUANTIZATIONS` holds them all; export,
    conversion, sizes, the reference and the CLI read nothing else."""

    name: str
    model_dtype: str  # float32 / float16: activations, unquantized weights, the scales
    quantized: bool = False  # MLC's 4-bit group quantization (the layout above), or none (q0*)
    description: str = ""  # one line for the command line's help
    # Decode GEMVs round their activations to int8 per group of 32 and use integer dot
    # products (compile/kernels/q8_gemv.py): a CPU-only variant with q4f16_1's weights.
    int8_activations: bool = False

    @property
    def scale_dtype(self) -> str:
        return self.model_dtype

    def param_dtype(self, name: str) -> str:
        """The dtype of parameter ``name`` when it is not quantized (for a
        quantized one: the dtype it is cast to before quantizing)."""
        return "float32" if name.rsplit(".", 1)[-1] in FP32_PARAMS else self.model_dtype

    def keeps(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether parameter ``name`` of ``shape`` stays unquantized: all of them
        without quantization; else all but the 2-D ``.weight`` tensors (linear
        weights, the embedding, an untied ``lm_head``), so ``A_log``,
        ``dt_bias``, norms and ``conv1d`` (3-D) stay, and the vision tower's
        (``visual.*``) all stay."""
        if name.startswith(VISION_PREFIX):
            return True  # the tower stays in the model dtype (docs/vision.md)
        return not self.quantized or len(shape) != 2 or not name.endswith(".weight")

    def stored(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], str]]:
        """What the tensor cache holds for original parameter ``name``: ``[(name,
        shape, dtype)]``, or for a quantized ``X.weight [N, K]`` ``[(X.weight,
        packed shape, uint32), (X.scale, scale shape, scale dtype)]``."""
        shape = tuple(int(d) for d in shape)
        if self.keeps(name, shape):
            return [(name, shape, self.param_dtype(name))]
        n, k = shape
        return [
            (name, packed_shape(n, k), STORAGE_DTYPE),
            (name[: -len("weight")] + "scale", scale_shape(n, k), self.scale_dtype),
        ]

    def nbytes(self, name: str, shape: tuple[int, ...]) -> int:
        """Bytes stored for original parameter ``name`` of ``shape``."""
        return sum(math.prod(s) * np.dtype(d).itemsize for _, s, d in self.stored(name, shape))

    def convert(self, name: str, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """The tensors stored for checkpoint tensor ``name`` (our parameter name),
        in :meth:`stored`'s order: ``[(X.weight, packed), (X.scale, scale)]`` when
        it is quantized (raises OverflowError/ValueError as :func:`quantize_weight`),
        else ``[(name, array)]`` as it is (the caller casts it to the dtype the
        export lists)."""
        if self.keeps(name, array.shape):
            return [(name, array)]
        packed, scale = quantize_weight(array, self)
        return [(name, packed), (name[: -len("weight")] + "scale", scale)]

    def reference_weight(self, name: str, array: np.ndarray) -> np.ndarray:
        """The float32 values a reference (transformers) must run with for
        parameter ``name`` to compute what the build computes: dequantized
        quantized weights, fp16-rounded fp16 parameters, the others as they are."""
        if not self.keeps(name, array.shape):
            return fake_quantize(array, self)
        if self.param_dtype(name) == "float16":
            return array.astype(np.float16).astype(np.float32)
        return array

    def quantize(self, model, name_prefix: str = "", kernels=None):
        """``(model, map)``: ``model`` (built in :attr:`model_dtype`) with every
        linear layer and embedding that :meth:`keeps` does not keep replaced by
        its quantized module, in place, and its :class:`QuantizeMap`; ``(model,
        None)`` without quantization.  ``kernels`` (a ``KernelSet``): where the
        int8-activation GEMV of :attr:`int8_activations` comes from."""
        if not self.quantized:
            return model, None
        from .model.quantized import quantize_model

        model = quantize_model(model, self, name_prefix, kernels=kernels)
        return model, model.quantize_map


_Q4 = "4-bit in groups of 32 (MLC's layout)"
QUANTIZATIONS: dict[str, Quantization] = {
    q.name: q
    for q in (
        Quantization("q0f32", "float32", description="float32, no quantization"),
        Quantization("q0f16", "float16", description="float16, no quantization"),
        Quantization("q4f16_1", "float16", True, "float16; linear weights and embedding: " + _Q4),
        Quantization("q4f32_1", "float32", True, "float32; linear weights and embedding: " + _Q4),
        Quantization(
            "q4f16_i8",
            "float16",
            True,
            "q4f16_1's weights; CPU decode with int8 activations per 32 (x86 AVX2, aarch64 dotprod)",
            int8_activations=True,
        ),
    )
}


def get(quant: str | Quantization) -> Quantization:
    """The registry entry of ``quant``; an unknown name is a UserError."""
    if isinstance(quant, Quantization):
        return quant
    try:
        return QUANTIZATIONS[quant]
    except KeyError:
        known = ", ".join(QUANTIZATIONS)
        raise UserError(f"unknown quantization '{quant}'; known: {known}") from None


def grouped(fmt: str | Quantization) -> Quantization:
    """The registry entry of ``fmt``, which must be a group quantization (q4*)."""
    q = get(fmt)
    if not q.quantized:
        raise ValueError(f"{q.name} is not a group quantization")
    return q


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


def quantize_weight(w: np.ndarray, fmt: str | Quantization) -> tuple[np.ndarray, np.ndarray]:
    """Group-quantize ``w [N, K]`` (any float dtype, bf16 included).

    Returns ``(packed uint32 [N, 4 ceil(K/32)], scale [N, ceil(K/32)])``; the
    scale has the format's model dtype.  Works ``ROW_CHUNK`` rows at a time,
    casting each chunk to the model dtype (pass the checkpoint's bf16/fp16/fp32
    array as it is: no full-size cast copy is made).  Raises OverflowError when
    a value does not fit the model dtype (fp16), ValueError on inf/nan.
    """
    f = grouped(fmt)
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
    packed: np.ndarray, scale: np.ndarray, fmt: str | Quantization, k: int | None = None
) -> np.ndarray:
    """The float32 ``[N, K]`` weight that the kernels compute with.

    ``k`` is the original input size (default: ``8 * packed.shape[1]``, right
    when 32 divides K).  The product ``(q - 7) * scale`` is rounded to the model
    dtype first, exactly as the compiled dequantization does.
    """
    f = grouped(fmt)
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


def fake_quantize(w: np.ndarray, fmt: str | Quantization) -> np.ndarray:
    """``dequantize(quantize(w))`` as float32 ``[N, K]``: the weights a reference
    (transformers) must run with to match the quantized kernels.  For q4f16_1
    the values are exactly representable in fp16."""
    packed, scale = quantize_weight(w, fmt)
    return dequantize_weight(packed, scale, fmt, k=w.shape[1])


# ---------------------------------------------------------------------------
# The map of a quantized model
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class QuantizeMap:
    """How a quantized model's parameters derive from the original ones (what
    :meth:`Quantization.quantize` did to one model).

    ``param_map``: original name -> ``[packed name, scale name]`` for every
    quantized tensor; parameters not listed are unchanged (same name, shape and
    dtype as before quantization).  ``shapes``: their original ``[N, K]``.
    """

    quant: Quantization
    param_map: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # original [N, K]

    def sources(
        self,
        expected: list[tuple[str, tuple[int, ...], str]] | dict[str, tuple[tuple[int, ...], str]],
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
            if name != self.param_map[orig][0]:
                continue  # the scale: written with its packed weight
            want = {q: (s, d) for q, s, d in self.quant.stored(orig, self.shapes[orig])}
            got = {q: by_name.get(q) for q in want}
            if got != want or list(want) != self.param_map[orig]:
                raise ValueError(f"parameters of quantized '{orig}' are {got}, expected {want}")
            plan.append((orig, self.shapes[orig], self.quant.param_dtype(orig), list(want)))
        return plan

    def source_of(self) -> dict[str, str]:
        """Quantized parameter name -> original parameter name."""
        return {q: orig for orig, names in self.param_map.items() for q in names}

    def convert(self, name: str, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """The tensors to store for original parameter ``name``: ``[(packed name,
        packed), (scale name, scale)]`` when it is quantized, else ``[(name, array)]``."""
        if name not in self.param_map:
            return [(name, array)]
        return self.quant.convert(name, array)


def quantized_nbytes(shape: tuple[int, ...], fmt: str | Quantization) -> int:
    """Bytes stored for a quantized ``[N, K]`` tensor (packed + scales)."""
    f = grouped(fmt)
    n, k = shape
    return (
        math.prod(packed_shape(n, k)) * 4
        + math.prod(scale_shape(n, k)) * np.dtype(f.scale_dtype).itemsize
    )
