"""The gated delta rule (Gated DeltaNet recurrence) as a CPU-scheduled TIR kernel.

Per sequence ``b`` and value head ``h`` (key head ``h // (Hv // Hk)``), in fp32::

    S = S * exp(g_t)             # S: [Dk, Dv]
    kv = S^T k_t                 # [Dv]
    d = (v_t - kv) * beta_t      # [Dv]
    S = S + k_t (outer) d
    o_t = S^T q_t                # [Dv]

Columns of ``S`` are independent of each other, so the kernel runs one task per
(sequence, value head, block of ``block_cols`` columns).  A task keeps its
``[Dk, block_cols]`` slice of the state in a private buffer (L1-sized) for the
whole token loop and makes two vectorised passes over it per token: one reading
``kv`` (two partial sums, to break the FMA dependency chain) and one updating the
state while accumulating the output.  The same kernel serves decode (T = 1, any
number of sequences) and prefill (T > 1, continuing from any input state).

The chunked (chunk 64) formulation is not used on the CPU.  Per head and chunk
of 64 tokens at Dk = Dv = 128 it needs about 4.5M multiply-adds (the two
64x64 Gram matrices, the triangular solve, three 64x128x128 products with the
state and the intra-chunk product), while the recurrence issues 4.2M vector-lane
operations (one multiply and three FMAs per state element and token).  The
recurrence measured here sustains roughly 90% of the core's FMA issue rate
(0.8B shape, T = 512: 4.9 ms on one Zen 5 core = 33.5M 512-bit operations, see
``scripts/bench_gdn_kernel.py``), so a chunked kernel cannot be faster on a CPU.
"""

from __future__ import annotations

import tvm
from tvm.relax.frontend.nn import Tensor, op
from tvm.script import tirx as T
from tvm.target import Target, codegen

from .checks import gdn_dims

__all__ = ["block_cols_for_target", "gated_delta_rule", "gated_delta_rule_func"]

# Partial sums of the ``kv`` reduction over Dk, to keep two FMA chains per vector.
_KV_SPLIT = 2


def block_cols_for_target(target: Target | None) -> int:
    """State columns per task that fit the vector registers of ``target``.

    The update pass holds ``2 * block_cols`` fp32 lanes in registers (output
    accumulators and the delta), so the block follows the register file: 64 for
    AVX-512, 32 for AVX2 and NEON (32 x 128 bit), 16 otherwise (SSE2, wasm SIMD).
    Without a target (``None``) the portable choice, 32, is returned.
    """
    if target is None or target.kind.name != "llvm":
        return 32
    if codegen.llvm_cpu_has_features("avx512f", target):
        return 64
    if codegen.llvm_cpu_has_features("avx2", target) or codegen.llvm_cpu_has_features(
        "neon", target
    ):
        return 32
    return 16


def gated_delta_rule_func(
    num_k_heads: int,
    num_v_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    dtype: str,
    block_cols: int,
) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc ``(q, k, v, g, beta, state, o, new_state)``.

    Shapes, with symbolic batch ``B`` and sequence length ``L``:
    q, k ``[B, L, Hk, Dk]`` and v ``[B, L, Hv, Dv]`` in ``dtype``; g, beta
    ``[B, L, Hv]`` float32; state and new_state ``[B, Hv, Dk, Dv]`` float32;
    o ``[B, L, Hv, Dv]`` float32.  ``block_cols`` must divide ``head_v_dim``.
    """
    if num_v_heads % num_k_heads:
        raise ValueError(
            f"num_v_heads {num_v_heads} is not a multiple of num_k_heads {num_k_heads}"
        )
    if head_v_dim % block_cols:
        raise ValueError(f"block_cols {block_cols} does not divide head_v_dim {head_v_dim}")
    if head_k_dim % _KV_SPLIT:
        raise ValueError(f"head_k_dim {head_k_dim} is not a multiple of {_KV_SPLIT}")
    hk, hv, dk, dv, cb, split = (
        num_k_heads,
        num_v_heads,
        head_k_dim,
        head_v_dim,
        block_cols,
        _KV_SPLIT,
    )
    group = hv // hk  # value heads per key head
    blocks = dv // cb  # column blocks per value head
    f32 = "float32"

    # Scratch buffers use scope "global": under TVM 0.27 every "local" allocation
    # on the CPU becomes a TVMBackendAllocWorkspace call, which LLVM cannot prove
    # free of aliasing, so the accumulators would not stay in registers.  Global
    # allocations under 1 KiB become stack allocas; the state block (larger) is
    # still taken from the workspace pool, which is fine.
    @T.prim_func(private=True)
    def gated_delta_rule_cpu(
        q_handle: T.handle,
        k_handle: T.handle,
        v_handle: T.handle,
        g_handle: T.handle,
        beta_handle: T.handle,
        state_handle: T.handle,
        o_handle: T.handle,
        new_state_handle: T.handle,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B = T.int64()
        L = T.int64()
        Q = T.match_buffer(q_handle, (B, L, hk, dk), dtype)
        K = T.match_buffer(k_handle, (B, L, hk, dk), dtype)
        V = T.match_buffer(v_handle, (B, L, hv, dv), dtype)
        G = T.match_buffer(g_handle, (B, L, hv), f32)
        Beta = T.match_buffer(beta_handle, (B, L, hv), f32)
        S_in = T.match_buffer(state_handle, (B, hv, dk, dv), f32)
        O = T.match_buffer(o_handle, (B, L, hv, dv), f32)
        S_out = T.match_buffer(new_state_handle, (B, hv, dk, dv), f32)
        for task in T.parallel(B * (hv * blocks)):
            S = T.alloc_buffer((dk, cb), f32, scope="global")  # this task's state columns
            k_t = T.alloc_buffer((dk,), f32, scope="global")
            q_t = T.alloc_buffer((dk,), f32, scope="global")
            kv = T.alloc_buffer((split, cb), f32, scope="global")  # partial sums of S^T k_t
            delta = T.alloc_buffer((cb,), f32, scope="global")
            o_t = T.alloc_buffer((cb,), f32, scope="global")
            b: T.let = task // (hv * blocks)
            h: T.let = task // blocks % hv
            col: T.let = task % blocks * cb
            kh: T.let = h // group
            for i in range(dk):
                for c in T.vectorized(cb):
                    S[i, c] = S_in[b, h, i, col + c]
            for t in range(L):
                for i in T.vectorized(dk):
                    k_t[i] = T.Cast(f32, K[b, t, kh, i])
                    q_t[i] = T.Cast(f32, Q[b, t, kh, i])
                # exp (a libm call) before the passes: called between them it made
                # LLVM spill the accumulators, costing ~25% at T = 512.
                decay: T.let = T.exp(G[b, t, h])
                # kv = S^T k_t (of the undecayed state; the decay is applied to the sum)
                for s in range(split):
                    for c in T.vectorized(cb):
                        kv[s, c] = T.float32(0)
                for io in range(dk // split):
                    for s in T.unroll(split):
                        for c in T.vectorized(cb):
                            kv[s, c] = kv[s, c] + S[io * split + s, c] * k_t[io * split + s]
                for s in range(1, split):
                    for c in T.vectorized(cb):
                        kv[0, c] = kv[0, c] + kv[s, c]
                for c in T.vectorized(cb):
                    delta[c] = (T.Cast(f32, V[b, t, h, col + c]) - kv[0, c] * decay) * Beta[b, t, h]
                    o_t[c] = T.float32(0)
                # S = S * decay + k_t delta^T;  o_t = S^T q_t
                for i in range(dk):
                    for c in T.vectorized(cb):
                        S[i, c] = S[i, c] * decay + k_t[i] * delta[c]
                        o_t[c] = o_t[c] + S[i, c] * q_t[i]
                for c in T.vectorized(cb):
                    O[b, t, h, col + c] = o_t[c]
            for i in range(dk):
                for c in T.vectorized(cb):
                    S_out[b, h, i, col + c] = S[i, c]

    return gated_delta_rule_cpu


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    state: Tensor,
    *,
    target: Target | None = None,
    block_cols: int | None = None,
    name: str = "gated_delta_rule",
) -> tuple[Tensor, Tensor]:
    """Run the gated delta rule over a sequence, starting from ``state``.

    Parameters
    ----------
    q, k : ``[B, T, Hk, Dk]``, model dtype (float32 or float16); already
        L2-normalised, and ``q`` already scaled by ``Dk ** -0.5``.
    v : ``[B, T, Hv, Dv]``, model dtype; ``Hv`` a multiple of ``Hk``.
    g : ``[B, T, Hv]`` float32, log-decay (the kernel applies ``exp``).
    beta : ``[B, T, Hv]`` float32.
    state : ``[B, Hv, Dk, Dv]`` float32 (zeros for a fresh sequence).
    target : the llvm target the kernel is built for; it sizes the column
        blocks (:func:`block_cols_for_target`; ``None``: the portable 32).
    block_cols : state columns per parallel task, instead of the target's
        (at most ``Dv``).

    Returns
    -------
    o : ``[B, T, Hv, Dv]`` float32.
    new_state : ``[B, Hv, Dk, Dv]`` float32.
    """
    dims = gdn_dims(q, k, v, g, beta, state)
    batch, seq_len = q.shape[0], q.shape[1]  # symbolic
    num_v_heads, head_k_dim, head_v_dim = dims.num_v_heads, dims.head_k_dim, dims.head_v_dim
    if block_cols is None:
        block_cols = min(block_cols_for_target(target), head_v_dim)
    func = gated_delta_rule_func(
        dims.num_k_heads, num_v_heads, head_k_dim, head_v_dim, dims.dtype, block_cols
    )
    return op.tensor_ir_op(
        func,
        name,
        args=[q, k, v, g, beta, state],
        out=(
            Tensor.placeholder((batch, seq_len, num_v_heads, head_v_dim), "float32"),
            Tensor.placeholder((batch, num_v_heads, head_k_dim, head_v_dim), "float32"),
        ),
    )
