"""Race-free merge of two attention states, for the paged KV cache on GPUs.

When a prefill continues a sequence, TVM's KV cache attends to the new tokens
(ragged kernel) and to the cached pages (paged kernel) separately and merges
the two partial results in place::

    m = max(s, s'),  w = 2^(s - m),  w' = 2^(s' - m)
    v <- (v w + v' w') / (w + w'),   s <- log2(w + w') + m

(``s`` is the log2-sum-exp of the attention scores, as TVM's GPU kernels keep
it.)  TVM 0.27's GPU ``tir_attention_merge_state`` lets every thread of a
head read ``s`` and then write it back with no barrier in between: the
threads that handle the other columns of the same head may read the new
value.  SIMT hardware that runs those threads in one warp hides the race;
PoCL (which runs work-items one after another) and GPUs with narrow warps
(4-wide on early Mali Bifrost) do not.  This kernel reads, computes, waits at
a barrier, then lets one thread per head write ``s``.  Same arguments, same
name, so the KV cache calls it unchanged (compile/pipeline.py swaps it in).
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

NAME = "tir_attention_merge_state"


def merge_state_func(
    num_heads: int, head_dim: int, dtype: str, max_threads: int = 256
) -> tvm.tirx.PrimFunc:
    """``(V [N, H, D] dtype, S [N, H] f32, V_other, S_other)``, V and S updated in place."""
    vec = 4 if head_dim % 4 == 0 else 1
    bdx = head_dim // vec  # threads per head, each ``vec`` columns
    bdy = max(1, min(num_heads, max_threads // bdx))  # heads per block
    gdy = (num_heads + bdy - 1) // bdy
    H, D = num_heads, head_dim
    f32 = "float32"

    @T.prim_func(private=True)
    def merge_state(
        v_handle: T.handle, s_handle: T.handle, v_other_handle: T.handle, s_other_handle: T.handle
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        N = T.int32()
        V = T.match_buffer(v_handle, (N, H, D), dtype)
        S = T.match_buffer(s_handle, (N, H), f32)
        V_other = T.match_buffer(v_other_handle, (N, H, D), dtype)
        S_other = T.match_buffer(s_other_handle, (N, H), f32)
        for bx in T.thread_binding(N, thread="blockIdx.x"):
            for by in T.thread_binding(gdy, thread="blockIdx.y"):
                for ty in T.thread_binding(bdy, thread="threadIdx.y"):
                    for tx in T.thread_binding(bdx, thread="threadIdx.x"):
                        w = T.alloc_buffer((3,), f32, scope="local")  # w, w', m
                        h: T.let = by * bdy + ty
                        if h < H:
                            w[2] = T.max(S[bx, h], S_other[bx, h])
                            w[0] = T.exp2(S[bx, h] - w[2])
                            w[1] = T.exp2(S_other[bx, h] - w[2])
                            for i in T.serial(vec):
                                V[bx, h, tx * vec + i] = T.Cast(
                                    dtype,
                                    (
                                        T.Cast(f32, V[bx, h, tx * vec + i]) * w[0]
                                        + T.Cast(f32, V_other[bx, h, tx * vec + i]) * w[1]
                                    )
                                    / (w[0] + w[1]),
                                )
                        # every thread of the head has read S before one writes it
                        T.tvm_storage_sync("shared")
                        if h < H and tx == 0:
                            S[bx, h] = T.log2(w[0] + w[1]) + w[2]

    return merge_state


def replace_merge_state(
    mod: tvm.IRModule, num_heads: int, head_dim: int, dtype: str, max_threads: int
) -> tvm.IRModule:
    """``mod`` with TVM's GPU merge kernel (if present) replaced by ours."""
    for gvar, func in mod.functions_items():
        if gvar.name_hint == NAME and isinstance(func, tvm.tirx.PrimFunc):
            mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)  # copy before update
            mod.update_func(
                gvar,
                merge_state_func(num_heads, head_dim, dtype, max_threads).with_attrs(func.attrs),
            )
            return mod
    return mod
