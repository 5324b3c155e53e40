"""Group quantization in Relax: ``nn`` modules holding a packed weight and its
scales that dequantize inside their matmul, and :func:`quantize_model`, the
rewrite of a model.  The layout, the numpy side and the registry of
quantizations are in ``compile/quantization.py``.

The modules (:class:`QuantizedLinear`, :class:`QuantizedEmbedding`) express
dequantization as a TE compute named ``dequantize`` feeding the matmul, in one
PrimFunc per layer, for every target and pipeline.  :func:`quantize_model`
swaps them in for every ``nn.Linear`` / ``nn.Embedding`` of a model and
records how each original parameter maps to the quantized ones
(:class:`~compile.quantization.QuantizeMap`).
"""

from __future__ import annotations

from typing import Any

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from ...errors import UserError
from ..quantization import (
    BITS,
    ELEMS_PER_WORD,
    GROUP_SIZE,
    MAX_INT,
    STORAGE_DTYPE,
    Quantization,
    QuantizeMap,
    grouped,
    packed_shape,
    scale_shape,
)

__all__ = [
    "QuantizedEmbedding",
    "QuantizedLinear",
    "dequantize_matmul_te",
    "dequantize_te",
    "quantize_model",
]


def _dequant_value(word, scale, k, dtype: str):
    """``(q - 7) * scale`` for column ``k``, given its packed word and its scale (TIR).

    The value is MLC's (``float(q) - 7`` times the scale, rounded to ``dtype``),
    computed in fp32 and rounded once: ``q - 7`` and its product with an fp16
    scale are exact in fp32, so one rounding to fp16 equals MLC's fp16
    arithmetic bit for bit, without fp16 arithmetic (which CPUs without native
    fp16 emulate by a convert per operation; measured 2x faster on x86).
    """
    shift = ((k % ELEMS_PER_WORD) * BITS).astype(STORAGE_DTYPE)
    nibble = tirx.bitwise_and(
        tirx.shift_right(word, shift), tirx.const((1 << BITS) - 1, STORAGE_DTYPE)
    )
    value = (nibble.astype("float32") - tirx.const(MAX_INT, "float32")) * scale.astype("float32")
    return value if dtype == "float32" else value.astype(dtype)


def dequantize_te(weight, scale, n, k: int, dtype: str):
    """TE compute ``[n, k]``: the dequantized weight (the fused kernel's producer)."""
    return te.compute(
        (n, k),
        lambda i, j: _dequant_value(
            weight[i, j // ELEMS_PER_WORD], scale[i, j // GROUP_SIZE], j, dtype
        ),
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
        lambda *i: te.sum(
            x[(*i[:-1], r)].astype("float32") * w[i[-1], r].astype("float32"), axis=r
        ),
        name="NT_matmul",
    )


class _Quantized(nn.Module):
    """``weight`` (packed uint32) and ``scale`` parameters of an ``[n, k]`` tensor."""

    def _make_params(self, n: int, k: int, fmt: Quantization, gemv=None) -> None:
        """``gemv``: the int8-activation decode GEMV (``KernelSet.q4_q8_gemv``), or None."""
        self.fmt = fmt
        self.gemv = gemv
        self.weight = nn.Parameter(packed_shape(n, k), STORAGE_DTYPE)
        self.scale = nn.Parameter(scale_shape(n, k), fmt.scale_dtype)

    def _matmul(self, x, n: int, k: int):
        """``x @ dequant(W)^T`` in fp32: the int8-activation decode GEMV where the format
        has one and it applies (``compile/kernels/q8_gemv.py``), else ONE TE function
        (dequantization fused).

        Expressed as a single TE compute rather than ``op.matmul`` of a
        dequantized tensor: Relax ``FuseOps`` does not fuse an injective producer
        into a matmul (MLC needs its own ``FuseDequantizeMatmulEwise`` pass for
        that), so the fusion is made here, for every target and pipeline.
        """
        y = self._int8_gemv(x, n, k)
        return y if y is not None else self._fp32_matmul(x, n, k)

    def _int8_gemv(self, x, n: int, k: int, **epilogue):
        """The int8-activation GEMV (``KernelSet.q4_q8_gemv``, ``epilogue``: its keyword
        arguments), or None where this format has none or it does not apply."""
        return (
            None if self.gemv is None else self.gemv(x, self.weight, self.scale, n, k, **epilogue)
        )

    def _fp32_matmul(self, x, n: int, k: int):
        """``x @ dequant(W)^T`` in fp32, dequantization fused (see :meth:`_matmul`)."""
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

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: str | Quantization,
        out_dtype: str | None = None,
        *,
        gemv=None,
    ):
        f = grouped(fmt)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.out_dtype = out_dtype or f.model_dtype
        self._make_params(self.out_features, self.in_features, f, gemv)

    def forward(self, x, residual=None):
        """``y`` in ``out_dtype``; with ``residual`` (fp32, an fp32 output) ``residual + y``:
        the int8 GEMV adds it as it stores (no kernel of its own)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"QuantizedLinear: input has {x.shape[-1]} features, expected {self.in_features}"
            )
        n, k = self.out_features, self.in_features
        y = self._int8_gemv(x, n, k, out_dtype=self.out_dtype, residual=residual)
        if y is not None:
            return y
        y = self._fp32_matmul(x, n, k)
        y = y if self.out_dtype == "float32" else y.astype(self.out_dtype)
        return y if residual is None else residual + y

    def swiglu(self, up: QuantizedLinear, x):
        """SwiGLU's ``silu(self(x)) * up(x)``: with the int8 GEMV one kernel that streams
        both weights (``q4_q8_gemv_swiglu``), else the two GEMVs and an elementwise kernel."""
        if up.out_features == self.out_features:
            n, k = self.out_features, self.in_features
            y = self._int8_gemv(x, n, k, out_dtype=self.out_dtype, up=(up.weight, up.scale))
            if y is not None:
                return y
        return op.silu(self(x)) * up(x)


class QuantizedEmbedding(_Quantized):
    """Embedding table ``[vocab, hidden]`` quantized along ``hidden``.

    ``forward(ids)`` gathers the packed rows and scales of ``ids`` and
    dequantizes only those (one TE function, ``dequantize_take``);
    ``lm_head_forward(x)`` is the tied head ``x @ dequant(table)^T`` in fp32,
    dequantization fused into the matmul.
    """

    def __init__(self, num: int, dim: int, fmt: str | Quantization, *, gemv=None):
        f = grouped(fmt)
        self.num, self.dim = int(num), int(dim)
        self._make_params(self.num, self.dim, f, gemv)

    def forward(self, ids):
        dtype, dim, last = self.fmt.model_dtype, self.dim, self.num - 1

        def gather(idx, w, s):
            def row(i):  # out-of-range ids are clipped, like the fp embedding's take(mode="clip")
                return tirx.max(
                    tirx.min(idx[i], tirx.IntImm(idx.dtype, last)), tirx.IntImm(idx.dtype, 0)
                )

            return te.compute(
                (idx.shape[0], dim),
                lambda i, j: _dequant_value(
                    w[row(i), j // ELEMS_PER_WORD], s[row(i), j // GROUP_SIZE], j, dtype
                ),
                name="dequantize_take",
            )

        flat = ids if ids.ndim == 1 else op.reshape(ids, [-1])
        out = op.tensor_expr_op(gather, "dequantize_take", [flat, self.weight, self.scale])
        return out if ids.ndim == 1 else op.reshape(out, [*ids.shape, dim])

    def lm_head_forward(self, x):
        """Logits ``x @ dequant(table)^T``, fp32."""
        return self._matmul(x, self.num, self.dim)


def quantize_model(model, fmt: str | Quantization, name_prefix: str = "", kernels=None):
    """Replace every ``nn.Linear`` and ``nn.Embedding`` of ``model`` whose weight
    the quantization does not keep (:meth:`Quantization.keeps`; with q4*: all)
    in place by :class:`QuantizedLinear` / :class:`QuantizedEmbedding`; returns
    the model.

    The model must have been built in the format's model dtype.  A Linear's
    output dtype is kept: the project's ``Linear`` (``compile/model/qwen35.py``)
    returns ``.out`` (fp32 for residual projections, else the model dtype);
    a plain ``nn.Linear`` its ``out_dtype`` (or its weight dtype).  Biases are
    refused (Qwen3.5 has none).  Other parameters (``A_log``, ``dt_bias``,
    norm and conv weights) are untouched; one that :meth:`Quantization.keeps`
    would not keep (a 2-D ``.weight`` outside a linear layer or embedding) is a
    ValueError.  The name map is stored as ``model.quantize_map``
    (:class:`QuantizeMap`).

    A format with ``int8_activations`` (q4f16_i8) takes its decode GEMV from
    ``kernels`` (a ``KernelSet``); kernels without one (a GPU's, a CPU without AVX2 or
    dotprod) are
    a UserError.  Without ``kernels`` (the parameter list alone) the layers keep the
    fp32 GEMV.
    """
    f = grouped(fmt)
    qmap = QuantizeMap(f)
    gemv = None
    if f.int8_activations and kernels is not None:
        gemv = kernels.q4_q8_gemv
        if gemv is None:
            where = f"the {kernels.backend} kernels of {kernels.target}"
            raise UserError(
                f"{f.name} needs the int8 decode GEMV, which exists for x86 CPUs with AVX2 and "
                "aarch64 CPUs with the dot-product extension only "
                f"({where} have none); use q4f16_1, the same weights with fp32 activations"
            )

    def check_dtype(name: str, param) -> None:
        if param.dtype != f.model_dtype:
            raise ValueError(
                f"{name}.weight is {param.dtype}, but {f.name} needs a model built in {f.model_dtype}"
            )

    def record(name: str, shape: tuple[int, int]) -> None:
        qmap.param_map[f"{name}.weight"] = [q for q, _, _ in f.stored(f"{name}.weight", shape)]
        qmap.shapes[f"{name}.weight"] = shape

    class _Mutator(nn.Mutator):
        def visit_module(self, name: str, node: Any) -> Any:
            if isinstance(node, nn.Linear):
                shape = (int(node.out_features), int(node.in_features))
                if f.keeps(f"{name}.weight", shape):
                    return node
                if getattr(node, "bias", None) is not None:
                    raise ValueError(
                        f"{name}: Linear with a bias is not supported by quantize_model"
                    )
                check_dtype(name, node.weight)
                out = getattr(node, "out", None) or node.out_dtype or node.weight.dtype
                record(name, shape)
                return QuantizedLinear(node.in_features, node.out_features, f, out, gemv=gemv)
            if isinstance(node, nn.Embedding):
                num, dim = (int(d) for d in node.weight.shape)
                if f.keeps(f"{name}.weight", (num, dim)):
                    return node
                check_dtype(name, node.weight)
                record(name, (num, dim))
                return QuantizedEmbedding(num, dim, f, gemv=gemv)
            return self.visit(name, node)

    model = _Mutator().visit(name_prefix, model)
    produced = qmap.source_of()
    for name, param in model.named_parameters(name_prefix):
        if name not in produced and not f.keeps(name, tuple(int(d) for d in param.shape)):
            raise ValueError(
                f"{name} {tuple(param.shape)}: {f.name} quantizes it, but it is no Linear or Embedding"
            )
    model.quantize_map = qmap
    return model
