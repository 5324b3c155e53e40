"""The decode GEMV of ``q4f16_i8``: 4-bit weights times 8-bit activations, integer dot products.

The weights are ``q4f16_1``'s, byte for byte (MLC's layout, ``compile/quantization.py``):
nibble ``q[n, k]`` in ``[0, 14]``, one fp16 scale ``s[n, g]`` per group ``g`` of 32 inputs,
``W[n, k] = (q[n, k] - 7) s[n, g]``.  The activations ``x [K]`` of a decode step are rounded
to int8 per group of 32 (what llama.cpp's ``Q8_0`` does)::

    d[g] = max_{k in g} |x[k]| / 127        a[k] = rint(x[k] / d[g])  (in [-127, 127])

so that the dot product of a group is one integer sum, scaled once::

    y[n] = sum_g s[n, g] d[g] (sum_{k in g} q[n, k] a[k] - 7 c[g]),   c[g] = sum_{k in g} a[k]

One hand-written TIR function, :func:`gemv_func` (``q4_q8_gemv``), per weight shape:

* first ``x`` -> ``a`` (int8, in the pair order below), ``d`` and ``7 c`` (fp32), per decode
  row (a few microseconds; a GEMV's input is quantized by each GEMV that reads it);
* then the GEMV, parallel over blocks of 8 output columns; per column it
  streams the packed row once.  x86 AVX2: a 32-byte load holds two groups (MLC packs ``k`` =
  2b and 2b + 1 into the low and high nibble of byte ``b``), so ``w & 15`` is the even inputs
  and ``w >> 4 & 15`` the odd inputs of both; ``vpmaddubsw`` (unsigned nibble x signed int8,
  adjacent pairs summed to int16: at most 2 x 15 x 127, no saturation) against the activations
  stored as ``[even(g), even(g + 1), odd(g), odd(g + 1)]`` per pair of groups, the two products
  added (int16), ``vpmaddwd`` by ones to int32 (lanes 0-3: group ``g``, 4-7: ``g + 1``), to fp32,
  and one FMA with ``[s d]`` of the two groups.  The ``7 c`` correction is one more FMA per 8
  groups.  About 6 instructions per 32 weights (``q4f16_1``'s fp32 GEMV: 43 on AVX2,
  docs/cpu-speed.md), so the kernel is bound by memory, not by arithmetic; the row 4 columns
  ahead is prefetched (without it the 0.8B LM head streamed at 6 GB/s per core instead of 8.4),
  non-temporally: a step reads each weight once, and on a victim L3 (AMD Zen) the streamed
  weights would otherwise push out the DeltaNet states the step reads and writes (their
  copies took 4.1 instead of 4.9 ms of a 0.8B step, session 10).
* aarch64 with the dot-product extension (``+dotprod``, the ``aarch64`` preset's fp16
  features): per group one 16-byte load, ``w & 15`` and ``w >> 4`` (nibbles 0-14 are
  non-negative int8s), two ``sdot`` against the group's even and odd activations (stored
  ``[even(g), odd(g)]``), to fp32, one FMA by the lane of ``s d`` (11 instructions per 32
  weights).
* the dot products end as the epilogue says: stored in the output dtype, added to a residual,
  or SwiGLU of two weight matrices (:func:`gemv_func`).

The integer part is exact; the fp32 sums are in a fixed order, so the output does not depend on
the thread count.  Against ``q4f16_1`` it differs by the rounding of the activations (about
0.5% of the largest output of one GEMV; docs/cpu-speed.md has the model-level figures).

Where the kernel does not apply (``K`` not a multiple of 64) the layer keeps the fp32 GEMV of
``q4f16_1`` (:func:`applies`); a target without either ISA has no kernel, and ``q4f16_i8`` is
refused for it.  Prefill (several rows) always does: the int8
path is a decode-step kernel.
"""

from __future__ import annotations

from tvm.relax.frontend.nn import Tensor, op
from tvm.script import tirx as T
from tvm.target import Target, codegen

__all__ = ["PLAIN", "RESIDUAL", "SWIGLU", "applies", "gemv", "gemv_func", "isa_of"]

GROUP = 32  # inputs per scale, weights and activations alike
ZERO = 7  # the weights' zero point (MLC's q4: q - 7)
_COLUMNS = 8  # output columns per parallel task
_PREFETCH_ROWS = 4  # the row this many columns ahead is prefetched while one is computed


#: The kernel variants (:func:`isa_of`).
AVX2 = "avx2"  # x86-64: vpmaddubsw + vpmaddwd on 256-bit registers (AVX-512 machines too)
NEON_DOTPROD = "neon-dotprod"  # aarch64 with the dot-product extension (ARMv8.2+): sdot


def isa_of(target: Target) -> str | None:
    """The kernel variant for the llvm ``target`` (its features, not the build machine's),
    or None where there is none."""
    if target.kind.name != "llvm":
        return None
    if codegen.llvm_cpu_has_features("avx2", target):
        return AVX2
    if "aarch64" in str(target.attrs.get("mtriple", "")) and codegen.llvm_cpu_has_features(
        "dotprod", target
    ):
        return NEON_DOTPROD
    return None


def applies(target: Target, k: int) -> bool:
    """Whether a decode GEMV with ``k`` inputs runs on this kernel for ``target``."""
    return isa_of(target) is not None and k % (2 * GROUP) == 0


def _chunk(groups: int) -> int:
    """Groups whose scales are loaded as one vector: 8, or 4 / 2 for small K."""
    return next(u for u in (8, 4, 2) if groups % u == 0)


#: What a GEMV does with its dot products (``epilogue`` of :func:`gemv_func`).
PLAIN, RESIDUAL, SWIGLU = "plain", "residual", "swiglu"


def gemv_func(
    n: int,
    k: int,
    x_dtype: str,
    scale_dtype: str,
    target: Target,
    *,
    out_dtype: str = "float32",
    epilogue: str = PLAIN,
):
    """``q4_q8_gemv(x [m, 1, k], W [n, k/8] uint32, s [n, k/32], ...) -> y [m, 1, n]`` for
    ``target`` (``m``: the decode batch, symbolic; a task's weight block stays in cache over
    the ``m`` rows).  One function: the activations are quantized first (scratch ``a``, ``d``,
    ``7c``), then the parallel GEMV, whose dot products ``t`` (fp32) end as ``epilogue`` says:

    * :data:`PLAIN`: ``y = t`` in ``out_dtype`` (rounded once, no cast kernel after it);
    * :data:`RESIDUAL`: ``q4_q8_gemv_residual(x, W, s, r [m, 1, n] fp32) -> y = r + t`` fp32
      (a projection into the residual stream, the add done in the store);
    * :data:`SWIGLU`: ``q4_q8_gemv_swiglu(x, W_gate, s_gate, W_up, s_up) -> y = silu(t_gate) *
      t_up`` in ``out_dtype`` (an MLP's gate and up projections: one quantization of ``x``,
      one launch, no ``[m, 1, n]`` intermediates), both rows of an output streamed together.

    (Quantization and GEMV are one function: a call with one tensor input is taken for a
    reshape by Relax's RewriteDataflowReshape, which then asserts a block structure
    hand-written TIR does not have.)"""
    isa = isa_of(target)
    if isa is None or k % (2 * GROUP):
        raise ValueError(f"no int8 GEMV for K={k} on {target}")
    if epilogue not in (PLAIN, RESIDUAL, SWIGLU):
        raise ValueError(f"unknown GEMV epilogue {epilogue!r}")
    if epilogue == RESIDUAL and out_dtype != "float32":
        raise ValueError("the residual stream is fp32")
    groups = k // GROUP
    u = _chunk(groups)  # groups per scale vector
    # At least two tasks where there are two columns (a parallel loop of one iteration is
    # removed in lowering, and the CPU check would rightly call the kernel serial).
    cols = next(c for c in (_COLUMNS, 4, 2, 1) if n % c == 0 and (n >= 2 * c or c == 1))
    words = groups * 4  # uint32 per row
    f32, f32u = "float32", f"float32x{u}"
    pd = _PREFETCH_ROWS
    pairs = u // 2
    odd = 32 if isa == AVX2 else 16  # where a group's odd inputs start after its even ones

    def lanes(p):  # the scale vector's lanes of pair p: [2p] x 4, [2p + 1] x 4
        # (a Shuffle has no more lanes than its inputs: sd is repeated 8 / u times)
        return [2 * p] * 4 + [2 * p + 1] * 4

    @T.macro
    def quantize(x, a, d, c7, m):
        """x [m, 1, k] -> a [m, k] int8 (pair order), d and 7c [m, groups] fp32."""
        # Scratch in scope "global" (stack or workspace; "local" would be a workspace call per
        # use, gated_delta_rule.py).
        peak = T.alloc_buffer((m, 8), f32, scope="global")
        top = T.alloc_buffer((m,), f32, scope="global")
        total = T.alloc_buffer((m, 16), "int32", scope="global")
        count = T.alloc_buffer((m,), "int32", scope="global")
        for r in T.parallel(m):  # decode: one row
            for g in range(groups):
                for i in T.vectorized(8):
                    peak[r, i] = T.float32(0)
                for j in range(GROUP // 8):
                    for i in T.vectorized(8):
                        # (no `v = ...` binding here: a let in a vectorized loop kept one lane)
                        peak[r, i] = T.max(
                            peak[r, i], T.abs(T.Cast(f32, x[r, 0, g * GROUP + j * 8 + i]))
                        )
                top[r] = peak[r, 0]
                for i in range(1, 8):
                    top[r] = T.max(top[r], peak[r, i])
                d[r, g] = top[r] / T.float32(127)
                inv: T.let = T.if_then_else(
                    top[r] > T.float32(0), T.float32(127) / top[r], T.float32(0)
                )
                # AVX2: [even(g), even(g+1), odd(g), odd(g+1)] per pair; NEON: [even(g), odd(g)]
                base: T.let = g // 2 * 64 + g % 2 * 16 if isa == AVX2 else g * GROUP
                for i in T.vectorized(16):
                    a[r, base + i] = T.Cast(
                        "int8", T.nearbyint(T.Cast(f32, x[r, 0, g * GROUP + 2 * i]) * inv)
                    )
                    a[r, base + odd + i] = T.Cast(
                        "int8", T.nearbyint(T.Cast(f32, x[r, 0, g * GROUP + 2 * i + 1]) * inv)
                    )
                for i in T.vectorized(16):
                    total[r, i] = T.Cast("int32", a[r, base + i]) + T.Cast(
                        "int32", a[r, base + odd + i]
                    )
                count[r] = 0
                for i in range(16):
                    count[r] = count[r] + total[r, i]
                c7[r, g] = T.Cast(f32, count[r] * ZERO)

    def low_nibbles(w, row, word):  # the even inputs of 2 groups: bytes & 15
        packed = T.reinterpret("uint8x32", w[row, T.Ramp(word, 1, 8)])
        return T.bitwise_and(packed, T.Broadcast(T.uint8(15), 32))

    def high_nibbles(w, row, word):  # the odd inputs: bytes >> 4 & 15
        packed = T.reinterpret("uint8x32", w[row, T.Ramp(word, 1, 8)])
        return T.bitwise_and(
            T.shift_right(packed, T.Broadcast(T.uint8(4), 32)), T.Broadcast(T.uint8(15), 32)
        )

    @T.macro
    def chunk_start(w, s, row, r, d, c7, sd, acc, at, chunk):
        """Per chunk of u groups, both ISAs: sd = s * d of its groups, the 7c correction
        accumulated at acc[at:at + u], and the row pd columns ahead prefetched, non-temporally
        (the weights are read once per step)."""
        sd[T.Ramp(0, 1, u)] = (
            T.Cast(f32u, s[row, T.Ramp(chunk * u, 1, u)]) * d[r, T.Ramp(chunk * u, 1, u)]
        )
        acc[T.Ramp(at, 1, u)] = (
            acc[T.Ramp(at, 1, u)] + sd[T.Ramp(0, 1, u)] * c7[r, T.Ramp(chunk * u, 1, u)]
        )
        for line in T.unroll(max(1, u // 4)):  # 64-byte lines of this chunk
            T.evaluate(
                T.call_llvm_intrin(
                    "void",
                    "llvm.prefetch.p0",
                    T.address_of(w[T.min(row + pd, n - 1), chunk * u * 4 + line * 16]),
                    T.int32(0),  # read
                    T.int32(0),  # non-temporal
                    T.int32(1),  # data
                )
            )

    @T.macro
    def dot_avx2(w, s, row, r, a, d, c7, out, slot):
        """out[slot] = the dot product of row ``row`` of (W, s) with activation row ``r``."""
        # acc[0:32]: one fp32x8 per pair slot (independent FMA chains); acc[32:40]: the 7c
        # correction.  sd: s * d of the chunk's groups.
        acc = T.alloc_buffer((40,), f32, scope="global")
        sd = T.alloc_buffer((u,), f32, scope="global")
        for i in T.unroll(5):
            acc[T.Ramp(i * 8, 1, 8)] = T.Broadcast(T.float32(0), 8)
        for chunk in range(groups // u):
            chunk_start(w, s, row, r, d, c7, sd, acc, 32, chunk)
            for p in T.unroll(pairs):
                # One expression, no `v = ...` bindings: in TVM 0.27 a binding inside a loop
                # becomes a workspace buffer, stored to on every use (docs/surprises.md).
                acc[T.Ramp(p % 4 * 8, 1, 8)] = acc[T.Ramp(p % 4 * 8, 1, 8)] + T.Cast(
                    "float32x8",
                    T.call_llvm_pure_intrin(
                        "int32x8",
                        "llvm.x86.avx2.pmadd.wd",
                        T.call_llvm_pure_intrin(
                            "int16x16",
                            "llvm.x86.avx2.pmadd.ub.sw",
                            low_nibbles(w, row, chunk * u * 4 + p * 8),
                            a[r, T.Ramp(chunk * u * GROUP + p * 64, 1, 32)],
                        )
                        + T.call_llvm_pure_intrin(
                            "int16x16",
                            "llvm.x86.avx2.pmadd.ub.sw",
                            high_nibbles(w, row, chunk * u * 4 + p * 8),
                            a[r, T.Ramp(chunk * u * GROUP + p * 64 + 32, 1, 32)],
                        ),
                        T.Broadcast(T.int16(1), 16),
                    ),
                ) * T.Shuffle([sd[T.Ramp(0, 1, u)]] * (8 // u), lanes(p))
        total8 = T.alloc_buffer((8,), f32, scope="global")
        total8[T.Ramp(0, 1, 8)] = (
            (acc[T.Ramp(0, 1, 8)] + acc[T.Ramp(8, 1, 8)])
            + (acc[T.Ramp(16, 1, 8)] + acc[T.Ramp(24, 1, 8)])
        ) - acc[T.Ramp(32, 1, 8)]
        out[slot] = ((total8[0] + total8[4]) + (total8[2] + total8[6])) + (
            (total8[1] + total8[5]) + (total8[3] + total8[7])
        )

    @T.macro
    def dot_neon(w, s, row, r, a, d, c7, out, slot):
        """aarch64 + dotprod: per group one 16-byte load, ``w & 15`` / ``w >> 4`` (the nibbles,
        0-14, are non-negative int8s) and two ``sdot`` against the group's even and odd
        activations (int32x4: four partial sums of the group), to fp32, one FMA with the
        group's ``s d`` broadcast; the ``7 c`` correction as on x86."""
        acc = T.alloc_buffer((16 + u,), f32, scope="global")  # 4 x fp32x4 slots, then 7c
        sd = T.alloc_buffer((u,), f32, scope="global")
        for i in T.unroll(4):
            acc[T.Ramp(i * 4, 1, 4)] = T.Broadcast(T.float32(0), 4)
        acc[T.Ramp(16, 1, u)] = T.Broadcast(T.float32(0), u)
        for chunk in range(groups // u):
            chunk_start(w, s, row, r, d, c7, sd, acc, 16, chunk)
            for gi in T.unroll(u):
                acc[T.Ramp(gi % 4 * 4, 1, 4)] = acc[T.Ramp(gi % 4 * 4, 1, 4)] + T.Cast(
                    "float32x4",
                    T.call_llvm_pure_intrin(
                        "int32x4",
                        "llvm.aarch64.neon.sdot.v4i32.v16i8",
                        T.call_llvm_pure_intrin(
                            "int32x4",
                            "llvm.aarch64.neon.sdot.v4i32.v16i8",
                            T.Broadcast(T.int32(0), 4),
                            T.reinterpret(
                                "int8x16",
                                T.bitwise_and(
                                    T.reinterpret(
                                        "uint8x16", w[row, T.Ramp((chunk * u + gi) * 4, 1, 4)]
                                    ),
                                    T.Broadcast(T.uint8(15), 16),
                                ),
                            ),
                            a[r, T.Ramp((chunk * u + gi) * GROUP, 1, 16)],
                        ),
                        T.reinterpret(
                            "int8x16",
                            T.shift_right(
                                T.reinterpret(
                                    "uint8x16", w[row, T.Ramp((chunk * u + gi) * 4, 1, 4)]
                                ),
                                T.Broadcast(T.uint8(4), 16),
                            ),
                        ),
                        a[r, T.Ramp((chunk * u + gi) * GROUP + 16, 1, 16)],
                    ),
                ) * T.Broadcast(sd[gi], 4)
        total4 = T.alloc_buffer((4,), f32, scope="global")
        total4[T.Ramp(0, 1, 4)] = (acc[T.Ramp(0, 1, 4)] + acc[T.Ramp(4, 1, 4)]) + (
            acc[T.Ramp(8, 1, 4)] + acc[T.Ramp(12, 1, 4)]
        )
        correction = T.alloc_buffer((1,), f32, scope="global")
        correction[0] = T.float32(0)
        for i in range(u):
            correction[0] = correction[0] + acc[16 + i]
        out[slot] = ((total4[0] + total4[2]) + (total4[1] + total4[3])) - correction[0]

    dot = dot_avx2 if isa == AVX2 else dot_neon

    if epilogue == PLAIN:

        @T.prim_func(private=True)
        def q4_q8_gemv(
            x_h: T.handle,
            w: T.Buffer((n, words), "uint32"),
            s: T.Buffer((n, groups), scale_dtype),
            y_h: T.handle,
        ):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, 1, k), x_dtype)
            y = T.match_buffer(y_h, (m, 1, n), out_dtype)
            a = T.alloc_buffer((m, k), "int8", scope="global")
            d = T.alloc_buffer((m, groups), f32, scope="global")
            c7 = T.alloc_buffer((m, groups), f32, scope="global")
            quantize(x, a, d, c7, m)
            for block in T.parallel(n // cols):
                for r, col in T.grid(m, cols):
                    t = T.alloc_buffer((1,), f32, scope="global")
                    dot(w, s, block * cols + col, r, a, d, c7, t, 0)
                    y[r, 0, block * cols + col] = T.Cast(out_dtype, t[0])

        return q4_q8_gemv

    if epilogue == RESIDUAL:

        @T.prim_func(private=True)
        def q4_q8_gemv_residual(
            x_h: T.handle,
            w: T.Buffer((n, words), "uint32"),
            s: T.Buffer((n, groups), scale_dtype),
            res_h: T.handle,
            y_h: T.handle,
        ):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, 1, k), x_dtype)
            res = T.match_buffer(res_h, (m, 1, n), f32)
            y = T.match_buffer(y_h, (m, 1, n), f32)
            a = T.alloc_buffer((m, k), "int8", scope="global")
            d = T.alloc_buffer((m, groups), f32, scope="global")
            c7 = T.alloc_buffer((m, groups), f32, scope="global")
            quantize(x, a, d, c7, m)
            for block in T.parallel(n // cols):
                for r, col in T.grid(m, cols):
                    t = T.alloc_buffer((1,), f32, scope="global")
                    dot(w, s, block * cols + col, r, a, d, c7, t, 0)
                    y[r, 0, block * cols + col] = res[r, 0, block * cols + col] + t[0]

        return q4_q8_gemv_residual

    @T.prim_func(private=True)
    def q4_q8_gemv_swiglu(
        x_h: T.handle,
        wg: T.Buffer((n, words), "uint32"),
        sg: T.Buffer((n, groups), scale_dtype),
        wu: T.Buffer((n, words), "uint32"),
        su: T.Buffer((n, groups), scale_dtype),
        y_h: T.handle,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, 1, k), x_dtype)
        y = T.match_buffer(y_h, (m, 1, n), out_dtype)
        a = T.alloc_buffer((m, k), "int8", scope="global")
        d = T.alloc_buffer((m, groups), f32, scope="global")
        c7 = T.alloc_buffer((m, groups), f32, scope="global")
        quantize(x, a, d, c7, m)
        for block in T.parallel(n // cols):
            for r, col in T.grid(m, cols):
                t = T.alloc_buffer((2,), f32, scope="global")
                dot(wg, sg, block * cols + col, r, a, d, c7, t, 0)
                dot(wu, su, block * cols + col, r, a, d, c7, t, 1)
                y[r, 0, block * cols + col] = T.Cast(
                    out_dtype, t[0] / (T.float32(1) + T.exp(-t[0])) * t[1]
                )

    return q4_q8_gemv_swiglu


def gemv(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    n: int,
    k: int,
    target: Target,
    *,
    out_dtype: str = "float32",
    residual: Tensor | None = None,
    up: tuple[Tensor, Tensor] | None = None,
) -> Tensor | None:
    """``x [m, 1, k] @ dequant(W)^T`` with int8 activations: ``[m, 1, n]`` in ``out_dtype``;
    with ``residual`` ([m, 1, n] fp32) ``residual + x W^T`` (fp32); with ``up`` (the up
    projection's weight and scale, same shape) SwiGLU's ``silu(x W^T) * (x W_up^T)``.
    None where the kernel does not apply (:func:`applies`, or ``x`` not one token per row)."""
    if x.ndim != 3 or not isinstance(x.shape[1], int) or x.shape[1] != 1 or not applies(target, k):
        return None
    m = x.shape[0]
    out = Tensor.placeholder((m, 1, n), out_dtype)
    if residual is not None:
        func = gemv_func(n, k, x.dtype, scale.dtype, target, epilogue=RESIDUAL)
        return op.tensor_ir_op(func, "q4_q8_gemv_residual", [x, weight, scale, residual], out)
    if up is not None:
        func = gemv_func(n, k, x.dtype, scale.dtype, target, out_dtype=out_dtype, epilogue=SWIGLU)
        return op.tensor_ir_op(func, "q4_q8_gemv_swiglu", [x, weight, scale, *up], out)
    func = gemv_func(n, k, x.dtype, scale.dtype, target, out_dtype=out_dtype)
    return op.tensor_ir_op(func, "q4_q8_gemv", [x, weight, scale], out)
