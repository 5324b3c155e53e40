"""The gated delta rule (Gated DeltaNet) as GPU-scheduled TIR kernels.

Same nn-level contract and math as :mod:`.gated_delta_rule` (the CPU kernel):
per sequence ``b`` and value head ``h`` (key head ``h // (Hv // Hk)``), fp32::

    S = S * exp(g_t); kv = S^T k_t; d = (v_t - kv) * beta_t; S += k_t (x) d; o_t = S^T q_t

Two formulations, both with explicit ``blockIdx.x`` / ``threadIdx.x`` bindings and
at most ``min(256, target.max_num_threads)`` threads per block; no loop is unrolled
by the schedule (phone OpenCL drivers reject big unrolls).

* **Recurrent** (decode, short sequences): one thread per state column, blocks
  over (sequence, value head, column block).  A thread keeps its state column
  ``S[:, c]`` (``Dk`` floats, scope ``local``) for the whole token loop.

* **Chunked** (prefill; chunk 64, as transformers' ``torch_chunk_gated_delta_rule``)
  in three kernels:

  1. ``gdn_chunk_prep`` -- blocks over (sequence, value head, chunk), one thread
     per chunk row ``t`` (64 threads; fewer, looping over rows, on a target that
     allows fewer): the cumulative log-decay ``gc_t`` within the chunk, the
     strictly lower UT system ``L[t, s] = beta_t (k_t . k_s) exp(gc_t - gc_s)``
     and the intra-chunk attention ``QK[t, s] = (q_t . k_s) exp(gc_t - gc_s)``
     (``s <= t``).
  2. ``gdn_chunk_solve`` -- blocks over (sequence, value head, chunk), one thread
     per column of ``[v_beta | k_beta exp(gc)]`` (``Dv + Dk`` columns): the
     triangular solve ``(I + L) X = rhs`` by forward substitution down the
     column, giving ``UW = (I + L)^-1 [v_beta | k_beta exp(gc)]``: ``U`` ("new
     values") in its first ``Dv`` columns, ``W`` ("k_cumdecay") in the last ``Dk``.
  3. ``gdn_chunk_scan`` -- the inter-chunk propagation, one thread per state
     column as in the recurrent kernel: per chunk ``v_new = U - W S``,
     ``o = exp(gc) q S + QK v_new``, ``S = S exp(gc_last) + (k exp(gc_last - gc))^T v_new``;
     ``gc`` is summed again from ``g`` (same order as the prep kernel, so the same bits).

  Every kernel binds at most 10 storage buffers (the scan: q, k, v, g, beta, state,
  qk, uw, o, new_state), the most TVM's web runtime asks a WebGPU adapter for.

  The last partial chunk is handled by masking (tokens past ``T`` read as zero,
  which is what the reference's zero padding does).

:func:`gated_delta_rule` with ``chunked=None`` (the default) picks the formulation
at run time: sequences shorter than ``min_chunked_len`` (64) take the recurrent
path inside the scan kernel (the prep and solve kernels then return at once), so
one compiled function serves decode and prefill.  A static ``T < 64`` (e.g. a
decode function exported with ``T = 1``) compiles the recurrent kernel alone.

Each kernel builder takes ``emulate=True`` to instantiate the very same body
with the thread bindings replaced by serial loops and ``local`` scratch by
``global``, so that it compiles for ``llvm`` and can be checked on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm.relax.frontend.nn import Tensor, op
from tvm.script import tirx as T
from tvm.target import Target

from .checks import gdn_dims

__all__ = [
    "CHUNK",
    "gated_delta_rule",
    "gdn_chunk_prep_func",
    "gdn_chunk_scan_func",
    "gdn_chunk_solve_func",
    "gdn_recurrent_func",
    "max_threads_for_target",
]

CHUNK = 64  # tokens per chunk, as the reference
_THREAD_CAP = 256  # threads per block, whatever the target allows


def max_threads_for_target(target: Target | None) -> int:
    """Threads per block for ``target``: ``min(256, max_num_threads)`` (256 without a target)."""
    limit = _THREAD_CAP
    if target is not None and target.attrs.get("max_num_threads") is not None:
        limit = min(limit, int(target.attrs["max_num_threads"]))
    return limit


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= ``cap`` that divides ``n``."""
    block = 1
    while block * 2 <= cap and n % (block * 2) == 0:
        block *= 2
    return block


def _pow2_at_most(n: int, cap: int) -> int:
    """The largest power of two <= min(n, cap) (at least 1)."""
    block = 1
    while block * 2 <= min(n, cap):
        block *= 2
    return block


def _loop_kinds(emulate: bool) -> tuple[Callable, str]:
    """(thread loop constructor, scratch scope) for a GPU or CPU-emulated kernel."""
    if emulate:
        return (lambda extent, tag: T.serial(extent)), "global"
    return (lambda extent, tag: T.thread_binding(extent, thread=tag)), "local"


def _check_heads(num_k_heads: int, num_v_heads: int) -> int:
    if num_v_heads % num_k_heads:
        raise ValueError(
            f"num_v_heads {num_v_heads} is not a multiple of num_k_heads {num_k_heads}"
        )
    return num_v_heads // num_k_heads


def gdn_recurrent_func(
    num_k_heads: int,
    num_v_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    dtype: str,
    max_threads: int = _THREAD_CAP,
    emulate: bool = False,
) -> tvm.tirx.PrimFunc:
    """The recurrent kernel ``(q, k, v, g, beta, state, o, new_state)``; shapes as
    :func:`gated_delta_rule`.  One thread per state column, ``Dv / threads`` blocks per head."""
    group = _check_heads(num_k_heads, num_v_heads)
    hk, hv, dk, dv = num_k_heads, num_v_heads, head_k_dim, head_v_dim
    tx = _pow2_divisor(dv, max_threads)
    nb = dv // tx
    loop, scope = _loop_kinds(emulate)
    f32 = "float32"

    @T.prim_func(private=True)
    def gdn_recurrent(
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
        for bx in loop(B * (hv * nb), "blockIdx.x"):
            for tid in loop(tx, "threadIdx.x"):
                S = T.alloc_buffer((dk,), f32, scope=scope)  # this thread's state column
                acc = T.alloc_buffer((3,), f32, scope=scope)
                b: T.let = bx // (hv * nb)
                h: T.let = bx // nb % hv
                c: T.let = bx % nb * tx + tid
                kh: T.let = h // group
                for i in range(dk):
                    S[i] = S_in[b, h, i, c]
                for t in range(L):
                    # kv = S^T k_t of the undecayed state; the decay is applied to the sum
                    acc[0] = T.float32(0)
                    for i in range(dk):
                        acc[0] = acc[0] + S[i] * T.Cast(f32, K[b, t, kh, i])
                    acc[1] = T.exp(G[b, t, h])  # decay
                    acc[0] = (T.Cast(f32, V[b, t, h, c]) - acc[0] * acc[1]) * Beta[b, t, h]  # delta
                    # S = S * decay + k_t delta; o_t = S^T q_t
                    acc[2] = T.float32(0)
                    for i in range(dk):
                        S[i] = S[i] * acc[1] + T.Cast(f32, K[b, t, kh, i]) * acc[0]
                        acc[2] = acc[2] + S[i] * T.Cast(f32, Q[b, t, kh, i])
                    O[b, t, h, c] = acc[2]
                for i in range(dk):
                    S_out[b, h, i, c] = S[i]

    return gdn_recurrent


def gdn_chunk_prep_func(
    num_k_heads: int,
    num_v_heads: int,
    head_k_dim: int,
    dtype: str,
    max_threads: int = _THREAD_CAP,
    min_chunked_len: int = 0,
    emulate: bool = False,
) -> tvm.tirx.PrimFunc:
    """Kernel 1 of the chunked form ``(q, k, g, beta, gc, lmat, qk)``.

    ``gc [B, Hv, NC, 64]``: cumulative log-decay in the chunk (padding tokens add 0);
    ``lmat [B, Hv, NC, 64, 64]``: ``beta_t (k_t . k_s) exp(gc_t - gc_s)`` for ``s < t``, else 0;
    ``qk [B, Hv, NC, 64, 64]``: ``(q_t . k_s) exp(gc_t - gc_s)`` for ``s <= t``, else 0.
    Rows of tokens past ``T`` are 0.  Does nothing when ``T < min_chunked_len``.
    """
    group = _check_heads(num_k_heads, num_v_heads)
    hk, hv, dk, C = num_k_heads, num_v_heads, head_k_dim, CHUNK
    tx = _pow2_at_most(
        C, max_threads
    )  # rows of the chunk per pass (all 64 unless the target allows fewer)
    loop, scope = _loop_kinds(emulate)
    f32 = "float32"

    @T.prim_func(private=True)
    def gdn_chunk_prep(
        q_handle: T.handle,
        k_handle: T.handle,
        g_handle: T.handle,
        beta_handle: T.handle,
        gc_handle: T.handle,
        lmat_handle: T.handle,
        qk_handle: T.handle,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B = T.int64()
        L = T.int64()
        NC = T.int64()
        Q = T.match_buffer(q_handle, (B, L, hk, dk), dtype)
        K = T.match_buffer(k_handle, (B, L, hk, dk), dtype)
        G = T.match_buffer(g_handle, (B, L, hv), f32)
        Beta = T.match_buffer(beta_handle, (B, L, hv), f32)
        Gc = T.match_buffer(gc_handle, (B, hv, NC, C), f32)
        Lm = T.match_buffer(lmat_handle, (B, hv, NC, C, C), f32)
        QK = T.match_buffer(qk_handle, (B, hv, NC, C, C), f32)
        for by in loop(B * hv, "blockIdx.y"):
            for n in loop(NC, "blockIdx.x"):
                for tid in loop(tx, "threadIdx.x"):
                    for r in range(C // tx):
                        # acc: [0] gc_t, [1] running gc_s, [2] k_t . k_s, [3] q_t . k_s
                        acc = T.alloc_buffer((4,), f32, scope=scope)
                        b: T.let = by // hv
                        h: T.let = by % hv
                        kh: T.let = h // group
                        t: T.let = r * tx + tid
                        tok: T.let = n * C + t
                        if L >= min_chunked_len:
                            acc[0] = T.float32(0)
                            for s in range(C):
                                if s <= t:
                                    acc[0] = acc[0] + T.if_then_else(
                                        n * C + s < L,
                                        G[b, T.min(n * C + s, L - 1), h],
                                        T.float32(0),
                                    )
                            Gc[b, h, n, t] = acc[0]
                            acc[1] = T.float32(0)
                            for s in range(C):
                                acc[1] = acc[1] + T.if_then_else(
                                    n * C + s < L, G[b, T.min(n * C + s, L - 1), h], T.float32(0)
                                )
                                if s <= t and tok < L:
                                    acc[2] = T.float32(0)
                                    acc[3] = T.float32(0)
                                    for i in range(dk):
                                        acc[2] = acc[2] + T.Cast(f32, K[b, tok, kh, i]) * T.Cast(
                                            f32, K[b, n * C + s, kh, i]
                                        )
                                        acc[3] = acc[3] + T.Cast(f32, Q[b, tok, kh, i]) * T.Cast(
                                            f32, K[b, n * C + s, kh, i]
                                        )
                                    QK[b, h, n, t, s] = acc[3] * T.exp(acc[0] - acc[1])
                                    Lm[b, h, n, t, s] = T.if_then_else(
                                        s < t,
                                        Beta[b, tok, h] * acc[2] * T.exp(acc[0] - acc[1]),
                                        T.float32(0),
                                    )
                                else:
                                    QK[b, h, n, t, s] = T.float32(0)
                                    Lm[b, h, n, t, s] = T.float32(0)

    return gdn_chunk_prep


def gdn_chunk_solve_func(
    num_k_heads: int,
    num_v_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    dtype: str,
    max_threads: int = _THREAD_CAP,
    min_chunked_len: int = 0,
    emulate: bool = False,
) -> tvm.tirx.PrimFunc:
    """Kernel 2 of the chunked form ``(k, v, beta, gc, lmat, uw)``.

    Solves ``(I + lmat) X = rhs`` by forward substitution, one thread per column of
    ``rhs = [v * beta | k * beta * exp(gc)]``: ``uw [B, Hv, NC, 64, Dv + Dk]``, ``u``
    in columns ``[0, Dv)`` and ``w`` in ``[Dv, Dv + Dk)``.  Rows of tokens past ``T`` are 0.
    """
    group = _check_heads(num_k_heads, num_v_heads)
    hk, hv, dk, dv, C = num_k_heads, num_v_heads, head_k_dim, head_v_dim, CHUNK
    cols = dv + dk
    tx = _pow2_at_most(cols, max_threads)
    nb = (cols + tx - 1) // tx
    loop, scope = _loop_kinds(emulate)
    f32 = "float32"

    @T.prim_func(private=True)
    def gdn_chunk_solve(
        k_handle: T.handle,
        v_handle: T.handle,
        beta_handle: T.handle,
        gc_handle: T.handle,
        lmat_handle: T.handle,
        uw_handle: T.handle,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B = T.int64()
        L = T.int64()
        NC = T.int64()
        K = T.match_buffer(k_handle, (B, L, hk, dk), dtype)
        V = T.match_buffer(v_handle, (B, L, hv, dv), dtype)
        Beta = T.match_buffer(beta_handle, (B, L, hv), f32)
        Gc = T.match_buffer(gc_handle, (B, hv, NC, C), f32)
        Lm = T.match_buffer(lmat_handle, (B, hv, NC, C, C), f32)
        UW = T.match_buffer(uw_handle, (B, hv, NC, C, cols), f32)
        for by in loop(B * hv, "blockIdx.y"):
            for bx in loop(NC * nb, "blockIdx.x"):
                for tid in loop(tx, "threadIdx.x"):
                    X = T.alloc_buffer(
                        (C,), f32, scope=scope
                    )  # this thread's column of the solution
                    acc = T.alloc_buffer((1,), f32, scope=scope)
                    b: T.let = by // hv
                    h: T.let = by % hv
                    n: T.let = bx // nb
                    j: T.let = bx % nb * tx + tid
                    kh: T.let = h // group
                    if L >= min_chunked_len and j < cols:
                        for t in range(C):
                            tok: T.let = T.min(n * C + t, L - 1)
                            if n * C + t < L:
                                if j < dv:
                                    acc[0] = (
                                        T.Cast(f32, V[b, tok, h, T.min(j, dv - 1)])
                                        * Beta[b, tok, h]
                                    )
                                else:
                                    acc[0] = (
                                        T.Cast(f32, K[b, tok, kh, T.max(j - dv, 0)])
                                        * Beta[b, tok, h]
                                        * T.exp(Gc[b, h, n, t])
                                    )
                            else:
                                acc[0] = T.float32(0)
                            for s in range(t):
                                acc[0] = acc[0] - Lm[b, h, n, t, s] * X[s]
                            X[t] = acc[0]
                            UW[b, h, n, t, j] = acc[0]

    return gdn_chunk_solve


def gdn_chunk_scan_func(
    num_k_heads: int,
    num_v_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    dtype: str,
    max_threads: int = _THREAD_CAP,
    min_chunked_len: int = 0,
    emulate: bool = False,
) -> tvm.tirx.PrimFunc:
    """Kernel 3 of the chunked form ``(q, k, v, g, beta, state, qk, uw, o, new_state)``.

    One thread per state column (kept in ``local``), sequential over the chunks.
    The cumulative log-decay ``gc`` is re-summed from ``g`` in the same order as
    :func:`gdn_chunk_prep_func` (one buffer fewer: 10, the WebGPU limit).
    When ``T < min_chunked_len`` it runs the recurrent form instead (from q, k, v,
    g, beta; the chunk buffers are then not read).
    """
    group = _check_heads(num_k_heads, num_v_heads)
    hk, hv, dk, dv, C = num_k_heads, num_v_heads, head_k_dim, head_v_dim, CHUNK
    tx = _pow2_divisor(dv, max_threads)
    nb = dv // tx
    loop, scope = _loop_kinds(emulate)
    f32 = "float32"

    @T.prim_func(private=True)
    def gdn_chunk_scan(
        q_handle: T.handle,
        k_handle: T.handle,
        v_handle: T.handle,
        g_handle: T.handle,
        beta_handle: T.handle,
        state_handle: T.handle,
        qk_handle: T.handle,
        uw_handle: T.handle,
        o_handle: T.handle,
        new_state_handle: T.handle,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B = T.int64()
        L = T.int64()
        NC = T.int64()
        Q = T.match_buffer(q_handle, (B, L, hk, dk), dtype)
        K = T.match_buffer(k_handle, (B, L, hk, dk), dtype)
        V = T.match_buffer(v_handle, (B, L, hv, dv), dtype)
        G = T.match_buffer(g_handle, (B, L, hv), f32)
        Beta = T.match_buffer(beta_handle, (B, L, hv), f32)
        S_in = T.match_buffer(state_handle, (B, hv, dk, dv), f32)
        QK = T.match_buffer(qk_handle, (B, hv, NC, C, C), f32)
        UW = T.match_buffer(uw_handle, (B, hv, NC, C, dv + dk), f32)
        O = T.match_buffer(o_handle, (B, L, hv, dv), f32)
        S_out = T.match_buffer(new_state_handle, (B, hv, dk, dv), f32)
        for bx in loop(B * (hv * nb), "blockIdx.x"):
            for tid in loop(tx, "threadIdx.x"):
                S = T.alloc_buffer((dk,), f32, scope=scope)  # this thread's state column
                vn = T.alloc_buffer((C,), f32, scope=scope)  # v_new of the chunk, this column
                acc = T.alloc_buffer((3,), f32, scope=scope)
                b: T.let = bx // (hv * nb)
                h: T.let = bx // nb % hv
                c: T.let = bx % nb * tx + tid
                kh: T.let = h // group
                for i in range(dk):
                    S[i] = S_in[b, h, i, c]
                if L >= min_chunked_len:
                    for n in range(NC):
                        # acc[2] = gc_last (padding tokens add 0); acc[1] = the running gc_t below
                        acc[2] = T.float32(0)
                        for t in range(C):
                            acc[2] = acc[2] + T.if_then_else(
                                n * C + t < L, G[b, T.min(n * C + t, L - 1), h], T.float32(0)
                            )
                        # v_new = U - W S
                        for t in range(C):
                            acc[0] = UW[b, h, n, t, c]
                            for i in range(dk):
                                acc[0] = acc[0] - UW[b, h, n, t, dv + i] * S[i]
                            vn[t] = acc[0]
                        # o = exp(gc) (q S) + QK v_new
                        acc[1] = T.float32(0)
                        for t in range(C):
                            acc[1] = acc[1] + T.if_then_else(
                                n * C + t < L, G[b, T.min(n * C + t, L - 1), h], T.float32(0)
                            )
                            if n * C + t < L:
                                acc[0] = T.float32(0)
                                for i in range(dk):
                                    acc[0] = acc[0] + T.Cast(f32, Q[b, n * C + t, kh, i]) * S[i]
                                acc[0] = acc[0] * T.exp(acc[1])
                                for s in range(t + 1):
                                    acc[0] = acc[0] + QK[b, h, n, t, s] * vn[s]
                                O[b, n * C + t, h, c] = acc[0]
                        # S = S exp(gc_last) + (k exp(gc_last - gc))^T v_new; padding rows of v_new are 0
                        acc[1] = T.float32(0)
                        for t in range(C):
                            acc[1] = acc[1] + T.if_then_else(
                                n * C + t < L, G[b, T.min(n * C + t, L - 1), h], T.float32(0)
                            )
                            vn[t] = vn[t] * T.exp(acc[2] - acc[1])
                        acc[1] = T.exp(acc[2])
                        for i in range(dk):
                            acc[0] = S[i] * acc[1]
                            for t in range(C):
                                acc[0] = (
                                    acc[0]
                                    + T.Cast(f32, K[b, T.min(n * C + t, L - 1), kh, i]) * vn[t]
                                )
                            S[i] = acc[0]
                else:
                    for t in range(L):
                        acc[0] = T.float32(0)
                        for i in range(dk):
                            acc[0] = acc[0] + S[i] * T.Cast(f32, K[b, t, kh, i])
                        acc[1] = T.exp(G[b, t, h])
                        acc[0] = (T.Cast(f32, V[b, t, h, c]) - acc[0] * acc[1]) * Beta[b, t, h]
                        acc[2] = T.float32(0)
                        for i in range(dk):
                            S[i] = S[i] * acc[1] + T.Cast(f32, K[b, t, kh, i]) * acc[0]
                            acc[2] = acc[2] + S[i] * T.Cast(f32, Q[b, t, kh, i])
                        O[b, t, h, c] = acc[2]
                for i in range(dk):
                    S_out[b, h, i, c] = S[i]

    return gdn_chunk_scan


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    state: Tensor,
    *,
    chunked: bool | None = None,
    target: Target | None = None,
    max_threads: int | None = None,
    emulate: bool = False,
    name: str = "gated_delta_rule",
) -> tuple[Tensor, Tensor]:
    """Run the gated delta rule over a sequence on a GPU, starting from ``state``.

    Parameters
    ----------
    q, k : ``[B, T, Hk, Dk]``, model dtype (float32 or float16); already
        L2-normalised, and ``q`` already scaled by ``Dk ** -0.5``.
    v : ``[B, T, Hv, Dv]``, model dtype; ``Hv`` a multiple of ``Hk``.
    g : ``[B, T, Hv]`` float32, log-decay (the kernel applies ``exp``).
    beta : ``[B, T, Hv]`` float32.
    state : ``[B, Hv, Dk, Dv]`` float32 (zeros for a fresh sequence).
    chunked : ``True``: always the chunked form; ``False``: always the recurrent
        form; ``None`` (default): recurrent when ``T`` is static and below 64,
        otherwise chosen at run time (chunked from ``T >= 64``).
    target : the GPU target the kernels are built for; it sizes the blocks
        (:func:`max_threads_for_target`; ``None``: 256 threads).  Emulated
        kernels take the GPU target they emulate.
    max_threads : threads per block, instead of the target's.
    emulate : build the kernels with serial loops instead of thread bindings (for
        checking them on a CPU target).

    Returns
    -------
    o : ``[B, T, Hv, Dv]`` float32.
    new_state : ``[B, Hv, Dk, Dv]`` float32.
    """
    dims = gdn_dims(q, k, v, g, beta, state)
    batch, seq_len = q.shape[0], q.shape[1]  # symbolic
    num_k_heads, num_v_heads = dims.num_k_heads, dims.num_v_heads
    head_k_dim, head_v_dim, dtype = dims.head_k_dim, dims.head_v_dim, dims.dtype
    if max_threads is None:
        max_threads = max_threads_for_target(target)
    o_shape = (batch, seq_len, num_v_heads, head_v_dim)
    state_shape = (batch, num_v_heads, head_k_dim, head_v_dim)
    static_short = isinstance(seq_len, int) and seq_len < CHUNK
    if chunked is False or (chunked is None and static_short):
        func = gdn_recurrent_func(
            num_k_heads, num_v_heads, head_k_dim, head_v_dim, dtype, max_threads, emulate=emulate
        )
        return op.tensor_ir_op(
            func,
            name,
            args=[q, k, v, g, beta, state],
            out=(
                Tensor.placeholder(o_shape, "float32"),
                Tensor.placeholder(state_shape, "float32"),
            ),
        )

    min_len = 0 if chunked else CHUNK
    num_chunks = (seq_len + CHUNK - 1) // CHUNK
    hv, dk, dv = num_v_heads, head_k_dim, head_v_dim
    prep = gdn_chunk_prep_func(num_k_heads, hv, dk, dtype, max_threads, min_len, emulate=emulate)
    gc, lmat, qk = op.tensor_ir_op(
        prep,
        f"{name}_chunk_prep",
        args=[q, k, g, beta],
        out=(
            Tensor.placeholder((batch, hv, num_chunks, CHUNK), "float32"),
            Tensor.placeholder((batch, hv, num_chunks, CHUNK, CHUNK), "float32"),
            Tensor.placeholder((batch, hv, num_chunks, CHUNK, CHUNK), "float32"),
        ),
    )
    solve = gdn_chunk_solve_func(
        num_k_heads, hv, dk, dv, dtype, max_threads, min_len, emulate=emulate
    )
    uw = op.tensor_ir_op(
        solve,
        f"{name}_chunk_solve",
        args=[k, v, beta, gc, lmat],
        out=Tensor.placeholder((batch, hv, num_chunks, CHUNK, dv + dk), "float32"),
    )
    scan = gdn_chunk_scan_func(
        num_k_heads, hv, dk, dv, dtype, max_threads, min_len, emulate=emulate
    )
    return op.tensor_ir_op(
        scan,
        f"{name}_chunk_scan",
        args=[q, k, v, g, beta, state, qk, uw],
        out=(Tensor.placeholder(o_shape, "float32"), Tensor.placeholder(state_shape, "float32")),
    )
