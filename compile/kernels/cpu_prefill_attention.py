"""Ragged prefill attention on the CPU: every core, vector registers.

The paged KV cache runs a prompt's self-attention (new tokens attending to new
tokens) through ``batch_prefill_ragged_kv``.  TVM 0.27's CPU version
(``_attention_prefill_ragged_cpu``) is one serial scalar loop nest over
sequences, queries, keys and heads: 2.2 s of a 5.2 s 512-token prefill of the
0.8B model (q4f16_1, AVX-512 EPYC, 2 threads; docs/cpu-speed.md).  This kernel
has the same parameters and meaning, so the KV cache calls it unchanged
(``compile/pipeline.py`` swaps it in for CPU builds):

* one parallel task per (query row, query head); the row's sequence is found
  in ``q_indptr``; with ``causal`` the row sees the keys up to its own position
  (``kv_len - q_len + i``, as TVM's mask), else all of its sequence's keys;
* keys in blocks of :data:`KEY_BLOCK`: the scores ``q . k * sm_scale * log2 e``
  (dot products vectorised over the head dimension, then the lanes summed),
  the block's maximum, the running output rescaled once per block
  (online softmax, base 2 like TVM's kernels), ``o += 2^(s - m) v`` vectorised;
* ``output = o / l`` in the model dtype, ``lse = m + log2 l`` (what the merge
  with the cached pages' attention expects).

Only ``rotary_mode == 0`` is implemented (RoPE applied before the cache,
``RopeMode.NORMAL``, what the model uses); any other value fails at run time.
"""

from __future__ import annotations

import math

import tvm
from tvm.script import tirx as T

#: The GlobalVar name of the CPU ragged prefill kernel in an exported module.
NAME = "batch_prefill_ragged_kv"

#: Keys scored before the running output is rescaled.
KEY_BLOCK = 16

_LOG2E = math.log2(math.e)


def ragged_prefill_func(
    num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: str, lanes: int
) -> tvm.tirx.PrimFunc:
    """The PrimFunc (TVM's ``batch_prefill_ragged_kv`` parameters).

    ``lanes`` (a power of two dividing ``head_dim``) is the vector width in
    float32 elements of the target.
    """
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads}")
    if lanes & (lanes - 1) or head_dim % lanes:
        raise ValueError(f"lanes {lanes} must be a power of two dividing head_dim {head_dim}")
    hq, hkv, d, kb, vl = num_q_heads, num_kv_heads, head_dim, KEY_BLOCK, lanes
    group = hq // hkv
    chunks = d // vl
    f32 = "float32"

    # Scratch in scope "global": small ones become stack allocas (see gated_delta_rule.py).
    @T.prim_func(private=True)
    def batch_prefill_ragged_kv(
        var_q: T.handle,
        var_q_indptr: T.handle,
        var_k: T.handle,
        var_v: T.handle,
        var_kv_indptr: T.handle,
        var_q_rope_position: T.handle,
        var_k_rope_pos_offset: T.handle,
        var_output: T.handle,
        var_lse: T.handle,
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_elem_offset = T.int32()
        kv_indptr_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q = T.match_buffer(var_q, (qo_len, hq, d), dtype)
        q_indptr = T.match_buffer(
            var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset
        )
        k = T.match_buffer(var_k, (kv_len, hkv, d), dtype)
        v = T.match_buffer(var_v, (kv_len, hkv, d), dtype)
        kv_indptr = T.match_buffer(
            var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_elem_offset
        )
        T.match_buffer(
            var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_position_elem_offset
        )
        T.match_buffer(
            var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset
        )
        output = T.match_buffer(var_output, (qo_len, hq, d), dtype)
        lse = T.match_buffer(var_lse, (qo_len, hq), f32)
        assert rotary_mode == 0, (
            "qwen35 CPU ragged prefill: only rotary_mode 0 (RoPE before the cache)"
        )
        for task in T.parallel(qo_len * hq):
            seq = T.alloc_buffer((1,), "int32", scope="global")
            qv = T.alloc_buffer((d,), f32, scope="global")
            o = T.alloc_buffer((d,), f32, scope="global")
            acc = T.alloc_buffer((vl,), f32, scope="global")
            s = T.alloc_buffer((kb,), f32, scope="global")
            run = T.alloc_buffer((3,), f32, scope="global")  # running max, sum, block max
            row: T.let = task // hq
            h: T.let = task % hq
            kh: T.let = h // group
            seq[0] = 0
            for b in range(batch_size):
                if q_indptr[b + 1] <= row:
                    seq[0] = b + 1
            q_start: T.let = q_indptr[seq[0]]
            kv_start: T.let = kv_indptr[seq[0]]
            kv_n: T.let = kv_indptr[seq[0] + 1] - kv_start
            n_keys: T.let = T.if_then_else(
                causal > 0,
                T.min(kv_n, kv_n - (q_indptr[seq[0] + 1] - q_start) + (row - q_start) + 1),
                kv_n,
            )
            for c in range(chunks):
                for lane in T.vectorized(vl):
                    qv[c * vl + lane] = T.Cast(f32, q[row, h, c * vl + lane]) * (
                        sm_scale * T.float32(_LOG2E)
                    )
                    o[c * vl + lane] = T.float32(0)
            run[0] = T.min_value(f32)
            run[1] = T.float32(0)
            for blk in range((n_keys + (kb - 1)) // kb):
                run[2] = run[0]
                for j in range(T.min(kb, n_keys - blk * kb)):
                    for lane in T.vectorized(vl):
                        acc[lane] = T.float32(0)
                    for c in range(chunks):
                        for lane in T.vectorized(vl):
                            acc[lane] = acc[lane] + qv[c * vl + lane] * T.Cast(
                                f32, k[kv_start + blk * kb + j, kh, c * vl + lane]
                            )
                    s[j] = acc[0]
                    for lane in T.unroll(1, vl):
                        s[j] = s[j] + acc[lane]
                    run[2] = T.max(run[2], s[j])
                # online softmax: rescale what was summed under the previous maximum
                run[1] = run[1] * T.exp2(run[0] - run[2])
                for c in range(chunks):
                    for lane in T.vectorized(vl):
                        o[c * vl + lane] = o[c * vl + lane] * T.exp2(run[0] - run[2])
                run[0] = run[2]
                for j in range(T.min(kb, n_keys - blk * kb)):
                    s[j] = T.exp2(s[j] - run[0])
                    run[1] = run[1] + s[j]
                    for c in range(chunks):
                        for lane in T.vectorized(vl):
                            o[c * vl + lane] = o[c * vl + lane] + s[j] * T.Cast(
                                f32, v[kv_start + blk * kb + j, kh, c * vl + lane]
                            )
            for c in range(chunks):
                for lane in T.vectorized(vl):
                    output[row, h, c * vl + lane] = T.Cast(
                        dtype,
                        T.if_then_else(
                            run[1] > T.float32(0), o[c * vl + lane] / run[1], T.float32(0)
                        ),
                    )
            lse[row, h] = T.if_then_else(
                run[1] > T.float32(0), run[0] + T.log2(run[1]), T.float32(-5e4)
            )

    return batch_prefill_ragged_kv


def replace_ragged_prefill(
    mod: tvm.IRModule, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: str, lanes: int
) -> tvm.IRModule:
    """``mod`` with TVM's CPU ragged prefill kernel (if present) replaced by ours."""
    for gvar, func in mod.functions_items():
        if gvar.name_hint == NAME and isinstance(func, tvm.tirx.PrimFunc):
            mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)  # copy before update
            ours = ragged_prefill_func(num_q_heads, num_kv_heads, head_dim, dtype, lanes)
            mod.update_func(gvar, ours.with_attrs(func.attrs).with_attr("tirx.is_scheduled", True))
            return mod
    return mod


#: The GlobalVar name of TVM's CPU decode kernel over the cache pages (no sliding window).
DECODE_NAME = "batch_decode_paged_kv_cpu"
#: The page size TVM 0.27 compiles its CPU decode kernel for (``_attention_decode_cpu``'s
#: default; ``PagedKVCache`` does not pass the cache's own).
DECODE_PAGE_SIZE = 16


def paged_decode_func(
    num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: str, lanes: int, page_size: int
) -> tvm.tirx.PrimFunc:
    """Decode attention over the cache pages (TVM's ``batch_decode_paged_kv_cpu`` parameters,
    no sliding window): one query row per sequence against all of its cached keys.

    TVM's kernel is one serial scalar loop over sequences, heads and keys: 12 ms of a 0.8B
    decode step at a 512-token context (2 threads, AVX2; docs/cpu-speed.md).  This one runs a
    parallel task per (sequence, query head) with the prefill kernel's blocked online softmax,
    the key rows read through the page table.
    """
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads}")
    if lanes & (lanes - 1) or head_dim % lanes:
        raise ValueError(f"lanes {lanes} must be a power of two dividing head_dim {head_dim}")
    hq, hkv, d, kb, vl, ps = num_q_heads, num_kv_heads, head_dim, KEY_BLOCK, lanes, page_size
    group = hq // hkv
    chunks = d // vl
    f32 = "float32"

    # Scratch in scope "global": small ones become stack allocas (see gated_delta_rule.py).
    @T.prim_func(private=True)
    def batch_decode_paged_kv(
        var_q: T.handle,
        var_pages: T.handle,
        var_page_indptr: T.handle,
        var_page_values: T.handle,
        var_length_info: T.handle,
        var_k_rope_pos_offset: T.handle,
        var_q_rope_position: T.handle,
        var_output: T.handle,
        var_lse: T.handle,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        q = T.match_buffer(var_q, (batch_size, hq, d), dtype)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, hkv, ps, d), dtype)
        page_indptr = T.match_buffer(
            var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_elem_offset
        )
        page_values = T.match_buffer(
            var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset
        )
        last_page_len = T.match_buffer(
            var_length_info, (batch_size,), "int32", elem_offset=length_info_elem_offset
        )
        T.match_buffer(
            var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset
        )
        T.match_buffer(
            var_q_rope_position, (batch_size,), "int32", elem_offset=q_rope_position_elem_offset
        )
        output = T.match_buffer(var_output, (batch_size, hq, d), dtype)
        lse = T.match_buffer(var_lse, (batch_size, hq), f32)
        assert rotary_mode == 0, (
            "qwen35 CPU paged decode: only rotary_mode 0 (RoPE before the cache)"
        )
        for task in T.parallel(batch_size * hq):
            qv = T.alloc_buffer((d,), f32, scope="global")
            o = T.alloc_buffer((d,), f32, scope="global")
            acc = T.alloc_buffer((vl,), f32, scope="global")
            s = T.alloc_buffer((kb,), f32, scope="global")
            run = T.alloc_buffer((3,), f32, scope="global")  # running max, sum, block max
            b: T.let = task // hq
            h: T.let = task % hq
            kh: T.let = h // group
            first: T.let = page_indptr[b]
            n_keys: T.let = T.if_then_else(
                page_indptr[b + 1] > first,
                (page_indptr[b + 1] - first - 1) * ps + last_page_len[b],
                0,
            )
            for c in range(chunks):
                for lane in T.vectorized(vl):
                    qv[c * vl + lane] = T.Cast(f32, q[b, h, c * vl + lane]) * (
                        sm_scale * T.float32(_LOG2E)
                    )
                    o[c * vl + lane] = T.float32(0)
            run[0] = T.min_value(f32)
            run[1] = T.float32(0)
            for blk in range((n_keys + (kb - 1)) // kb):
                run[2] = run[0]
                for j in range(T.min(kb, n_keys - blk * kb)):
                    for lane in T.vectorized(vl):
                        acc[lane] = T.float32(0)
                    for c in range(chunks):
                        for lane in T.vectorized(vl):
                            acc[lane] = acc[lane] + qv[c * vl + lane] * T.Cast(
                                f32,
                                pages[
                                    page_values[first + (blk * kb + j) // ps],
                                    0,
                                    kh,
                                    (blk * kb + j) % ps,
                                    c * vl + lane,
                                ],
                            )
                    s[j] = acc[0]
                    for lane in T.unroll(1, vl):
                        s[j] = s[j] + acc[lane]
                    run[2] = T.max(run[2], s[j])
                # online softmax: rescale what was summed under the previous maximum
                run[1] = run[1] * T.exp2(run[0] - run[2])
                for c in range(chunks):
                    for lane in T.vectorized(vl):
                        o[c * vl + lane] = o[c * vl + lane] * T.exp2(run[0] - run[2])
                run[0] = run[2]
                for j in range(T.min(kb, n_keys - blk * kb)):
                    s[j] = T.exp2(s[j] - run[0])
                    run[1] = run[1] + s[j]
                    for c in range(chunks):
                        for lane in T.vectorized(vl):
                            o[c * vl + lane] = o[c * vl + lane] + s[j] * T.Cast(
                                f32,
                                pages[
                                    page_values[first + (blk * kb + j) // ps],
                                    1,
                                    kh,
                                    (blk * kb + j) % ps,
                                    c * vl + lane,
                                ],
                            )
            for c in range(chunks):
                for lane in T.vectorized(vl):
                    output[b, h, c * vl + lane] = T.Cast(
                        dtype,
                        T.if_then_else(
                            run[1] > T.float32(0), o[c * vl + lane] / run[1], T.float32(0)
                        ),
                    )
            lse[b, h] = T.if_then_else(
                run[1] > T.float32(0), run[0] + T.log2(run[1]), T.float32(-5e4)
            )

    return batch_decode_paged_kv


def replace_paged_decode(
    mod: tvm.IRModule, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: str, lanes: int
) -> tvm.IRModule:
    """``mod`` with TVM's CPU paged decode kernel (if present) replaced by ours (pages of
    :data:`DECODE_PAGE_SIZE` rows, what TVM 0.27 builds its CPU decode kernel for)."""
    for gvar, func in mod.functions_items():
        if gvar.name_hint == DECODE_NAME and isinstance(func, tvm.tirx.PrimFunc):
            page_size = DECODE_PAGE_SIZE
            mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)  # copy before update
            ours = paged_decode_func(num_q_heads, num_kv_heads, head_dim, dtype, lanes, page_size)
            mod.update_func(gvar, ours.with_attrs(func.attrs).with_attr("tirx.is_scheduled", True))
            return mod
    return mod
