"""Our CPU ragged prefill attention (compile/kernels/cpu_prefill_attention.py)
against a float64 numpy reference: two sequences in one call (the second
continuing, more keys than queries), causal and not, float32 and float16, the
output and TVM's base-2 log-sum-exp; grouped heads (4 query heads per key head);
21 keys, a partial block of 16. Negative control: a corrupted
output fails the same comparison; rotary_mode 1 (not implemented) is refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm

from qwen35_mobile.compile.kernels.cpu_prefill_attention import ragged_prefill_func
from qwen35_mobile.compile.schedule_cpu import cpu_target

HQ, HKV, D = 8, 2, 48
Q_LENS, KV_LENS = [5, 7], [5, 21]  # the second sequence continues: 14 cached keys


@pytest.fixture(scope="module")
def target():
    return cpu_target({"kind": "llvm", "mcpu": "native"})


def _inputs(dtype, seed=0):
    rng = np.random.default_rng(seed)
    q_indptr = np.cumsum([0, *Q_LENS]).astype("int32")
    kv_indptr = np.cumsum([0, *KV_LENS]).astype("int32")
    q = rng.standard_normal((q_indptr[-1], HQ, D)).astype(dtype)
    k = rng.standard_normal((kv_indptr[-1], HKV, D)).astype(dtype)
    v = rng.standard_normal((kv_indptr[-1], HKV, D)).astype(dtype)
    return q, q_indptr, k, v, kv_indptr


def _reference(q, q_indptr, k, v, kv_indptr, causal, sm_scale):
    out = np.zeros(q.shape, np.float64)
    lse = np.zeros(q.shape[:2], np.float64)
    for b, (q_len, kv_len) in enumerate(zip(Q_LENS, KV_LENS, strict=True)):
        for i in range(q_len):
            row = q_indptr[b] + i
            n = min(kv_len, kv_len - q_len + i + 1) if causal else kv_len
            keys = slice(kv_indptr[b], kv_indptr[b] + n)
            for h in range(HQ):
                kh = h // (HQ // HKV)
                s = k[keys, kh].astype(np.float64) @ q[row, h].astype(np.float64)
                s *= sm_scale * math.log2(math.e)
                p = np.exp2(s - s.max())
                out[row, h] = p @ v[keys, kh].astype(np.float64) / p.sum()
                lse[row, h] = s.max() + math.log2(p.sum())
    return out, lse


def _run(target, dtype, causal, rotary_mode=0):
    kernel = ragged_prefill_func(HQ, HKV, D, dtype, 16 if D % 16 == 0 else 8)
    lib = tvm.tirx.build(
        tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target=target
    )
    q, q_indptr, k, v, kv_indptr = _inputs(dtype)
    tensor = tvm.runtime.tensor
    out = tensor(np.zeros(q.shape, dtype))
    lse = tensor(np.zeros(q.shape[:2], "float32"))
    sm_scale = 1 / math.sqrt(D)
    lib["main"](
        tensor(q),
        tensor(q_indptr),
        tensor(k),
        tensor(v),
        tensor(kv_indptr),
        tensor(np.zeros(len(q), "int32")),
        tensor(np.zeros(len(Q_LENS), "int32")),
        out,
        lse,
        causal,
        rotary_mode,
        1.0,
        1e6,
        sm_scale,
    )
    want = _reference(q, q_indptr, k, v, kv_indptr, causal, sm_scale)
    return out.numpy().astype(np.float64), lse.numpy().astype(np.float64), want


@pytest.mark.parametrize("causal", [1, 0])
@pytest.mark.parametrize(("dtype", "atol"), [("float32", 2e-6), ("float16", 2e-3)])
def test_matches_float64_reference(target, dtype, atol, causal):
    """atol: float32 accumulation over <= 21 keys of unit-variance values (measured
    <= 6e-7); float16 rounds the output (half an ulp at |o| < 2 is 1e-3)."""
    out, lse, (want_out, want_lse) = _run(target, dtype, causal)
    np.testing.assert_allclose(out, want_out, atol=atol, rtol=0)
    np.testing.assert_allclose(lse, want_lse, atol=2e-6 if dtype == "float32" else 1e-5, rtol=0)
    # negative control: the same comparison catches one wrong value
    bad = out.copy()
    bad[3, 5, 7] += 10 * atol
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(bad, want_out, atol=atol, rtol=0)


def test_causal_mask_is_what_makes_the_difference(target):
    causal, _, _ = _run(target, "float32", 1)
    full, _, _ = _run(target, "float32", 0)
    # the last query of each sequence sees every key either way; the first does not
    assert np.allclose(causal[4], full[4]) and not np.allclose(causal[0], full[0])


def test_rotary_mode_other_than_zero_is_refused(target):
    with pytest.raises(Exception, match="rotary_mode 0"):
        _run(target, "float32", 1, rotary_mode=1)


# ---------------------------------------------------------------- paged decode
# Two sequences of 37 and 16 cached keys (3 and 1 pages of 16; the first sequence's pages
# scattered and out of order in the pool), one query row each.
DECODE_LENS, PAGES = [37, 16], [[5, 1, 3], [0]]


def _run_decode(target, dtype, seed=1, kernel_pages=None):
    """(kernel output, float64 reference); ``kernel_pages``: another page table for the
    kernel only (the negative control)."""
    from qwen35_mobile.compile.kernels.cpu_prefill_attention import (
        DECODE_PAGE_SIZE as PS,
    )
    from qwen35_mobile.compile.kernels.cpu_prefill_attention import (
        paged_decode_func,
    )

    kernel = paged_decode_func(HQ, HKV, D, dtype, 16, PS)
    lib = tvm.tirx.build(
        tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target=target
    )
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((6, 2, HKV, PS, D)).astype(dtype)
    q = rng.standard_normal((len(DECODE_LENS), HQ, D)).astype(dtype)
    indptr = np.cumsum([0, *map(len, PAGES)]).astype("int32")
    values = np.array([p for pages in kernel_pages or PAGES for p in pages], "int32")
    last = np.array([n - (len(p) - 1) * PS for n, p in zip(DECODE_LENS, PAGES, strict=True)])
    tensor = tvm.runtime.tensor
    out = tensor(np.zeros(q.shape, dtype))
    lse = tensor(np.zeros(q.shape[:2], "float32"))
    sm_scale = 1 / math.sqrt(D)
    zeros = tensor(np.zeros(len(DECODE_LENS), "int32"))
    lib["main"](
        tensor(q), tensor(pool), tensor(indptr), tensor(values), tensor(last.astype("int32")),
        zeros, zeros, out, lse, 0, 1.0, 1e6, sm_scale,
    )  # fmt: skip
    want = np.zeros(q.shape, np.float64)
    for b, (n, pages) in enumerate(zip(DECODE_LENS, PAGES, strict=True)):
        rows = np.concatenate([pool[p] for p in pages], axis=2)[:, :, :n].astype(np.float64)
        for h in range(HQ):
            keys, vals = rows[0, h // (HQ // HKV)], rows[1, h // (HQ // HKV)]
            s = keys @ q[b, h].astype(np.float64) * sm_scale
            p = np.exp(s - s.max())
            want[b, h] = p @ vals / p.sum()
    return out.numpy().astype(np.float64), want


@pytest.mark.parametrize(("dtype", "atol"), [("float32", 2e-6), ("float16", 2e-3)])
def test_paged_decode_matches_float64_reference(target, dtype, atol):
    """Our replacement of TVM's serial batch_decode_paged_kv_cpu: the keys found through the
    page table (a partial last page), grouped heads, against numpy."""
    out, want = _run_decode(target, dtype)
    np.testing.assert_allclose(out, want, atol=atol, rtol=0)
    # negative control: one page of the table wrong (page 4 read for page 3) shows
    wrong, _ = _run_decode(target, dtype, kernel_pages=[[5, 1, 4], [0]])
    assert np.abs(wrong - want).max() > 100 * atol
