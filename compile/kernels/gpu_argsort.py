"""Rows sorted in descending order, with the index of each entry: a bitonic
sort on the GPU.

TVM's GPU sort (``topi.gpu.argsort``, which ``DispatchSortScan`` picks for GPU
targets) launches its merge passes over ``blockIdx.z``, which the WebGPU code
generator refuses ("blockIdx.z is not supported in WebGPU"); WebLLM's sampler
needs a descending argsort of the probabilities on WebGPU (compile/model/webllm.py).

A row of ``V`` entries is padded to ``N = 2**ceil(log2 V)`` with -inf keys (they
sort last) and sorted by a bitonic network: for ``k = 2, 4, ..., N`` and
``j = k/2, ..., 1`` one pass compares entry ``lo`` with ``lo + j`` (one thread per
pair, every row at once) and orders the pair descending where ``lo & k == 0``,
ascending elsewhere; after the last pass the row descends.  Ties are ordered by
index (the key is (value, -index)), so the order is total and the result is the
one a stable descending sort gives.  ``log2(N) * (log2(N) + 1) / 2`` passes (171
for Qwen3.5's 248,320-token vocabulary), each a launch of ``N/2`` threads per row,
out of place; ``k`` and ``j`` are scalar arguments of one kernel.
"""

from __future__ import annotations

from tvm import relax, tirx
from tvm.script import tirx as T

__all__ = ["argsort_descending", "bitonic_passes"]

_THREADS = 256


def bitonic_passes(n: int) -> list[tuple[int, int]]:
    """The (k, j) of each pass for rows of ``n`` (a power of two) entries."""
    out, k = [], 2
    while k <= n:
        j = k // 2
        while j > 0:
            out.append((k, j))
            j //= 2
        k *= 2
    return out


def _kernels(vocab: int, padded: int):
    half, threads = padded // 2, _THREADS

    @T.prim_func(private=True)
    def bitonic_init(probs_h: T.handle, keys_h: T.handle, ids_h: T.handle):
        # keys = the row padded with -inf, ids = 0, 1, 2, ...
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        probs = T.match_buffer(probs_h, (n, vocab), "float32")
        keys = T.match_buffer(keys_h, (n, padded), "float32")
        ids = T.match_buffer(ids_h, (n, padded), "int32")
        for bx in T.thread_binding(n * (padded // threads), "blockIdx.x"):
            for tx in T.thread_binding(threads, "threadIdx.x"):
                r: T.let = bx // (padded // threads)
                i: T.let = bx % (padded // threads) * threads + tx
                keys[r, i] = T.if_then_else(
                    i < vocab, probs[r, T.min(i, vocab - 1)], T.min_value("float32")
                )
                ids[r, i] = T.Cast("int32", i)

    @T.prim_func(private=True)
    def bitonic_pass(
        keys_h: T.handle,
        ids_h: T.handle,
        k: T.int64,
        j: T.int64,
        keys_out_h: T.handle,
        ids_out_h: T.handle,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        keys = T.match_buffer(keys_h, (n, padded), "float32")
        ids = T.match_buffer(ids_h, (n, padded), "int32")
        keys_out = T.match_buffer(keys_out_h, (n, padded), "float32")
        ids_out = T.match_buffer(ids_out_h, (n, padded), "int32")
        for bx in T.thread_binding(n * (half // threads), "blockIdx.x"):
            for tx in T.thread_binding(threads, "threadIdx.x"):
                r: T.let = bx // (half // threads)
                q: T.let = bx % (half // threads) * threads + tx  # pair index in the row
                lo: T.let = q // j * 2 * j + q % j
                hi: T.let = lo + j
                # the hi entry comes first: a larger key, or an equal key and a smaller index
                hi_first: T.let = T.Or(
                    keys[r, hi] > keys[r, lo],
                    T.And(keys[r, hi] == keys[r, lo], ids[r, hi] < ids[r, lo]),
                )
                swap: T.let = T.if_then_else(
                    T.bitwise_and(lo, k) == T.int64(0), hi_first, T.Not(hi_first)
                )
                keys_out[r, lo] = T.if_then_else(swap, keys[r, hi], keys[r, lo])
                keys_out[r, hi] = T.if_then_else(swap, keys[r, lo], keys[r, hi])
                ids_out[r, lo] = T.if_then_else(swap, ids[r, hi], ids[r, lo])
                ids_out[r, hi] = T.if_then_else(swap, ids[r, lo], ids[r, hi])

    @T.prim_func(private=True)
    def bitonic_take(keys_h: T.handle, ids_h: T.handle, sorted_h: T.handle, order_h: T.handle):
        # the first vocab entries of each sorted row (the padding sorted last)
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        keys = T.match_buffer(keys_h, (n, padded), "float32")
        ids = T.match_buffer(ids_h, (n, padded), "int32")
        out = T.match_buffer(sorted_h, (n, vocab), "float32")
        order = T.match_buffer(order_h, (n, vocab), "int32")
        for bx in T.thread_binding(n * (padded // threads), "blockIdx.x"):
            for tx in T.thread_binding(threads, "threadIdx.x"):
                r: T.let = bx // (padded // threads)
                i: T.let = bx % (padded // threads) * threads + tx
                if i < vocab:
                    out[r, i] = keys[r, i]
                    order[r, i] = ids[r, i]

    return bitonic_init, bitonic_pass, bitonic_take


def argsort_descending(
    bb: relax.BlockBuilder, probs: relax.Expr, vocab: int, prefix: str = ""
) -> relax.Expr:
    """Emit, into ``bb``'s current function, the sort of ``probs`` [n, vocab]
    float32 rows: a tuple (sorted values [n, vocab] float32, their indices
    [n, vocab] int32), each row descending; its kernels are ``<prefix>bitonic_*``."""
    padded = max(2 * _THREADS, 1 << (vocab - 1).bit_length())
    init, step, take = (
        bb.add_func(f, name)
        for f, name in zip(
            _kernels(vocab, padded),
            (f"{prefix}bitonic_init", f"{prefix}bitonic_pass", f"{prefix}bitonic_take"),
        )
    )
    n = probs.ty.shape[0]
    keys_t = relax.TensorType([n, padded], "float32")
    ids_t = relax.TensorType([n, padded], "int32")
    state = bb.emit(relax.call_tir(init, [probs], [keys_t, ids_t]))
    for k, j in bitonic_passes(padded):
        keys, ids = bb.emit(relax.TupleGetItem(state, 0)), bb.emit(relax.TupleGetItem(state, 1))
        pk, pj = (relax.prim_value(tirx.IntImm("int64", v)) for v in (k, j))
        state = bb.emit(relax.call_tir(step, [keys, ids, pk, pj], [keys_t, ids_t]))
    keys, ids = bb.emit(relax.TupleGetItem(state, 0)), bb.emit(relax.TupleGetItem(state, 1))
    return bb.emit(
        relax.call_tir(
            take,
            [keys, ids],
            [relax.TensorType([n, vocab], "float32"), relax.TensorType([n, vocab], "int32")],
        )
    )
