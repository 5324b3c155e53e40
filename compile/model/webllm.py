"""What WebLLM (npm ``@mlc-ai/web-llm`` 0.2.86) calls besides the decoder.

WebLLM's ``LLMChatPipeline`` opens a model library through its VM and:

* reads ``_metadata()``, a JSON string: ``kv_state_kind: "hybrid"`` makes it
  call ``batch_prefill(embeds [1, s, h], logit_positions [p], kv_cache,
  rnn_state, params)`` and ``batch_decode(embeds [b, 1, h], kv_cache,
  rnn_state, params)`` (:class:`..qwen35.Qwen35LM` exports them for web
  builds), create its states with ``create_tir_paged_kv_cache`` and
  ``create_rnn_state``; ``params`` names the tensors it loads from the tensor
  cache, in the order the functions take them; ``prefill_chunk_size`` is the
  longest chunk it prefills at once;
* samples on the GPU through six functions that must all exist (it looks them
  up when it loads the model), whatever the request:
  ``softmax_with_temperature``, ``argsort_probs``, ``sample_with_top_p`` and
  the in-place logit processors ``apply_logit_bias_inplace``,
  ``apply_penalty_inplace`` and ``apply_bitmask_inplace``.

This module builds ``_metadata`` and those six as a Relax module of their own
(no parameters).  The processors are small hand-scheduled kernels (one thread
per listed token, or per vocabulary entry for the bitmask); softmax is TE
(topi's, scheduled by dlight); the sort is ours (:mod:`..kernels.gpu_argsort`: TVM's GPU
sort launches over ``blockIdx.z``, which WGSL lacks), and so is the top-p
sampler: TVM's GPU scan (``gpu_2d_continuous_cumsum``) assumes CUDA's lock-step
warps (no barrier between its in-warp steps) and returned wrong prefix sums on
lavapipe (docs/web.md).  Shapes: b sequences, n rows of probabilities, m
samples, V the vocabulary, t listed tokens.
"""

from __future__ import annotations

import json

import tvm
from tvm import relax, te, tirx, topi
from tvm.script import tirx as T  # noqa: N812 (TVMScript's name)

from ..kernels.gpu_argsort import argsort_descending

#: The functions :func:`webllm_module` defines, in this order.
FUNCTIONS = (
    "_metadata",
    "softmax_with_temperature",
    "argsort_probs",
    "sample_with_top_p",
    "apply_logit_bias_inplace",
    "apply_penalty_inplace",
    "apply_bitmask_inplace",
)

# Every kernel of the module is named webllm_<name>: joined with the decoder's module, it
# must not renumber the decoder's kernels (the host twin, which has no sampler, names them
# as the device build does, and the kernel replay pairs them by name).
PREFIX = "webllm_"
_THREADS = 256  # threads per workgroup of the processors (every GPU preset allows 256)


def metadata(params: list[tuple[str, tuple[int, ...], str]], prefill_chunk_size: int) -> dict:
    """The JSON ``_metadata`` returns: a hybrid (KV cache + RNN state) model,
    its parameters in packed order, and the longest prefill chunk."""
    return {
        "model_type": "qwen3_5",
        "kv_state_kind": "hybrid",
        "prefill_chunk_size": prefill_chunk_size,
        "params": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in params],
    }


def _kernels(vocab: int):
    """The three in-place logit processors and the top-p sampler, as scheduled PrimFuncs."""
    words = (vocab + 31) // 32
    threads = _THREADS

    @T.prim_func(private=True)
    def logit_bias(logits_h: T.handle, pos2seq_h: T.handle, ids_h: T.handle, bias_h: T.handle):
        # logits[pos2seq[i], ids[i]] += bias[i] for each listed token i
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b, t = T.int64(), T.int64()
        logits = T.match_buffer(logits_h, (b, vocab), "float32")
        pos2seq = T.match_buffer(pos2seq_h, (t,), "int32")
        ids = T.match_buffer(ids_h, (t,), "int32")
        bias = T.match_buffer(bias_h, (t,), "float32")
        for bx in T.thread_binding((t + threads - 1) // threads, "blockIdx.x"):
            for tx in T.thread_binding(threads, "threadIdx.x"):
                i: T.let = bx * threads + tx
                if i < t:
                    logits[pos2seq[i], ids[i]] = logits[pos2seq[i], ids[i]] + bias[i]

    @T.prim_func(private=True)
    def penalty(
        logits_h: T.handle,
        seq_ids_h: T.handle,
        pos2seq_h: T.handle,
        ids_h: T.handle,
        counts_h: T.handle,
        penalties_h: T.handle,
    ):
        # For listed token i of sequence s = pos2seq[i] (row seq_ids[s]):
        #   l -= presence[s] + count[i] * frequency[s];  l = l < 0 ? l * rep[s] : l / rep[s]
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b, ns, t = T.int64(), T.int64(), T.int64()
        logits = T.match_buffer(logits_h, (b, vocab), "float32")
        seq_ids = T.match_buffer(seq_ids_h, (ns,), "int32")
        pos2seq = T.match_buffer(pos2seq_h, (t,), "int32")
        ids = T.match_buffer(ids_h, (t,), "int32")
        counts = T.match_buffer(counts_h, (t,), "int32")
        penalties = T.match_buffer(
            penalties_h, (ns, 3), "float32"
        )  # presence, frequency, repetition
        for bx in T.thread_binding((t + threads - 1) // threads, "blockIdx.x"):
            for tx in T.thread_binding(threads, "threadIdx.x"):
                i: T.let = bx * threads + tx
                if i < t:
                    s: T.let = pos2seq[i]
                    row: T.let = seq_ids[s]
                    shifted: T.let = logits[row, ids[i]] - (
                        penalties[s, 0] + T.Cast("float32", counts[i]) * penalties[s, 1]
                    )
                    logits[row, ids[i]] = T.if_then_else(
                        shifted < T.float32(0),
                        shifted * penalties[s, 2],
                        shifted / penalties[s, 2],
                    )

    @T.prim_func(private=True)
    def bitmask(logits_h: T.handle, seq_ids_h: T.handle, mask_h: T.handle):
        # Token v of row seq_ids[s] keeps its logit when bit v % 32 of word v // 32 is set,
        # else gets the lowest float32 (never sampled).
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b, ns = T.int64(), T.int64()
        logits = T.match_buffer(logits_h, (b, vocab), "float32")
        seq_ids = T.match_buffer(seq_ids_h, (ns,), "int32")
        mask = T.match_buffer(mask_h, (b, words), "int32")
        for bx in T.thread_binding((ns * vocab + threads - 1) // threads, "blockIdx.x"):
            for tx in T.thread_binding(threads, "threadIdx.x"):
                k: T.let = bx * threads + tx
                if k < ns * vocab:
                    row: T.let = seq_ids[k // vocab]
                    v: T.let = k % vocab
                    word: T.let = mask[row, v // 32]
                    if T.bitwise_and(T.shift_right(word, T.Cast("int32", v % 32)), 1) == 0:
                        logits[row, v] = T.min_value("float32")

    chunk = (vocab + threads - 1) // threads  # entries of a row per thread

    @T.prim_func(private=True)
    def top_p_sample(
        probs_h: T.handle,
        ids_h: T.handle,
        uniform_h: T.handle,
        rows_h: T.handle,
        top_p_h: T.handle,
        out_h: T.handle,
    ):
        # One workgroup per sample i, row r = rows[i] of sorted probabilities; thread t
        # walks entries [t * chunk, (t + 1) * chunk) with a running sum that starts at the
        # mass of the entries before its chunk, so every prefix sum is the same float in
        # each of the three walks:
        #   kept = #{j : mass before j < top_p[r]} (at least 1), mass = prefix(kept - 1),
        #   pick = min(#{j < kept : prefix(j) <= uniform[i] * mass}, kept - 1),
        #   out[i] = ids[r, pick].
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n, m = T.int64(), T.int64()
        probs = T.match_buffer(probs_h, (n, vocab), "float32")
        ids = T.match_buffer(ids_h, (n, vocab), "int32")
        uniform = T.match_buffer(uniform_h, (m,), "float32")
        rows = T.match_buffer(rows_h, (m,), "int32")
        top_p = T.match_buffer(top_p_h, (n,), "float32")
        out = T.match_buffer(out_h, (m,), "int32")
        for bx in T.thread_binding(m, "blockIdx.x"):
            for tx in T.thread_binding(threads, "threadIdx.x"):
                sums = T.alloc_buffer((threads,), "float32", scope="shared")  # of each chunk
                before = T.alloc_buffer((threads,), "float32", scope="shared")  # each chunk's
                count = T.alloc_buffer((threads,), "int32", scope="shared")
                found = T.alloc_buffer((2,), "float32", scope="shared")  # kept, mass
                run = T.alloc_buffer((2,), "float32", scope="local")
                num = T.alloc_buffer((2,), "int32", scope="local")  # a count, kept
                r: T.let = rows[bx]
                lo: T.let = tx * chunk
                run[0] = T.float32(0)
                for j in range(chunk):
                    if lo + j < vocab:
                        run[0] = run[0] + probs[r, lo + j]
                sums[tx] = run[0]
                T.tvm_storage_sync("shared")
                if tx == 0:  # the mass before each chunk
                    run[1] = T.float32(0)
                    for c in range(threads):
                        before[c] = run[1]
                        run[1] = run[1] + sums[c]
                T.tvm_storage_sync("shared")
                run[0] = before[tx]
                num[0] = 0
                for j in range(chunk):
                    if lo + j < vocab:
                        if run[0] < top_p[r]:
                            num[0] = num[0] + 1
                        run[0] = run[0] + probs[r, lo + j]
                count[tx] = num[0]
                T.tvm_storage_sync("shared")
                if tx == 0:
                    num[0] = 0
                    for c in range(threads):
                        num[0] = num[0] + count[c]
                    found[0] = T.Cast("float32", T.max(num[0], 1))
                T.tvm_storage_sync("shared")
                num[1] = T.Cast("int32", found[0])  # kept
                run[0] = before[tx]
                for j in range(chunk):
                    if lo + j < vocab:
                        run[0] = run[0] + probs[r, lo + j]
                        if lo + j == num[1] - 1:
                            found[1] = run[0]
                T.tvm_storage_sync("shared")
                run[1] = uniform[bx] * found[1]
                run[0] = before[tx]
                num[0] = 0
                for j in range(chunk):
                    if lo + j < num[1]:
                        run[0] = run[0] + probs[r, lo + j]
                        if run[0] <= run[1]:
                            num[0] = num[0] + 1
                count[tx] = num[0]
                T.tvm_storage_sync("shared")
                if tx == 0:
                    num[0] = 0
                    for c in range(threads):
                        num[0] = num[0] + count[c]
                    out[bx] = ids[r, T.min(num[0], num[1] - 1)]

    return logit_bias, penalty, bitmask, top_p_sample


def webllm_module(
    vocab: int, params: list[tuple[str, tuple[int, ...], str]], prefill_chunk_size: int
):
    """The IRModule of :data:`FUNCTIONS` for a vocabulary of ``vocab`` tokens."""
    logit_bias, penalty, bitmask, top_p_sample = _kernels(vocab)

    bb = relax.BlockBuilder()
    i32, f32 = "int32", "float32"
    logits = relax.TensorType([tirx.Var("b", "int64"), vocab], f32)
    ns, t = tirx.Var("ns", "int64"), tirx.Var("t", "int64")
    listed = {d: relax.TensorType([t], d) for d in (i32, f32)}
    seqs = relax.TensorType([ns], i32)
    processors = [  # (function, kernel, kernel name, arguments after the logits)
        (
            "apply_logit_bias_inplace",
            logit_bias,
            "logit_bias",
            [("pos2seq", listed[i32]), ("token_ids", listed[i32]), ("bias", listed[f32])],
        ),
        (
            "apply_penalty_inplace",
            penalty,
            "penalty",
            [
                ("seq_ids", seqs),
                ("pos2seq", listed[i32]),
                ("token_ids", listed[i32]),
                ("counts", listed[i32]),
                ("penalties", relax.TensorType([ns, 3], f32)),
            ],
        ),
        (
            "apply_bitmask_inplace",
            bitmask,
            "bitmask",
            [
                ("seq_ids", seqs),
                ("mask", relax.TensorType([logits.shape[0], (vocab + 31) // 32], i32)),
            ],
        ),
    ]
    n, m = tirx.Var("n", "int64"), tirx.Var("m", "int64")
    b = logits.shape[0]
    args = [
        relax.Var("logits", relax.TensorType([b, 1, vocab], f32)),
        relax.Var("temperature", relax.TensorType([b], f32)),
    ]
    with bb.function("softmax_with_temperature", params=args):
        with bb.dataflow():  # (FuseOps fuses within dataflow blocks)
            scaled = bb.emit(
                bb.call_te(
                    lambda x, t: te.compute(x.shape, lambda i, j, v: x[i, j, v] / t[i]),
                    *args,
                    primfunc_name_hint=f"{PREFIX}scale",
                )
            )
            probs = bb.emit_output(
                bb.call_te(topi.nn.softmax, scaled, axis=-1, primfunc_name_hint=f"{PREFIX}softmax")
            )
        bb.emit_func_output(probs)
    probs = relax.Var("probs", relax.TensorType([n, vocab], f32))
    with bb.function("argsort_probs", params=[probs]):
        # each row in descending order of probability, and the token of each entry
        bb.emit_func_output(argsort_descending(bb, probs, vocab, PREFIX))
    sampler = bb.add_func(top_p_sample, f"{PREFIX}top_p_sample")
    args = [
        relax.Var("sorted_probs", relax.TensorType([n, vocab], f32)),
        relax.Var("sorted_ids", relax.TensorType([n, vocab], i32)),
        relax.Var("uniform", relax.TensorType([m], f32)),
        relax.Var("rows", relax.TensorType([m], i32)),
        relax.Var("top_p", relax.TensorType([n], f32)),
    ]
    with bb.function("sample_with_top_p", params=args):
        out = bb.emit(relax.call_tir(sampler, args, relax.TensorType([m], i32)))
        bb.emit_func_output(out)
    for name, kernel, kernel_name, rest in processors:
        gv = bb.add_func(kernel, f"{PREFIX}{kernel_name}")
        args = [relax.Var("logits", logits)] + [relax.Var(n, sinfo) for n, sinfo in rest]
        with bb.function(name, params=args):
            # the logits are updated in place (WebLLM passes a view of its logits and reads it back)
            out = bb.emit(relax.call_tir_inplace(gv, args, inplace_indices=[0], out_ty=logits))
            bb.emit_func_output(out)
    with bb.function("_metadata", params=[]):
        bb.emit_func_output(tvm.ir.StringImm(json.dumps(metadata(params, prefill_chunk_size))))
    return bb.get()


def alias(mod, name: str, of: str):
    """``mod`` with a Relax function ``name`` that calls ``of`` with its arguments
    (WebLLM's ``create_tir_paged_kv_cache`` is our ``create_paged_kv_cache``: a second
    export of the constructor would add the cache's kernels twice, under the same names)."""
    func = mod[of]
    params = []
    for p in func.params:
        if not isinstance(p.ty, relax.ShapeType):
            raise ValueError(f"alias: {of} takes {p.name}: {p.ty}, not a shape")
        params.append(
            relax.Var(p.name, relax.ShapeType([tirx.Var(p.name, "int64") for _ in p.ty.values]))
        )
    bb = relax.BlockBuilder(mod)
    with bb.function(name, params=params, attrs={"num_input": len(params)}):
        bb.emit_func_output(bb.emit(relax.Call(mod.get_global_var(of), params)))
    return bb.get()
