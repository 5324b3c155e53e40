"""Group quantization q4f16_1 / q4f32_1 (compile/quantization.py,
compile/model/quantized.py) and the registry of quantizations.

numpy: round-trip error bound, the exact packing layout on a hand example,
bit-exact agreement with MLC's quantization arithmetic (re-expressed in TE and
run by TVM), padding of K.  nn: a small module with QuantizedLinear (symbolic
rows) and QuantizedEmbedding (take + tied head) built for llvm with the default
pipeline and with ``cpu_pipeline``, compared with numpy; the dequantization
and the matmul are one PrimFunc after the pipeline.  quantize_model on the
tiny Qwen3.5 exports, with the expected packed parameters.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import relax, te, tirx
from tvm.relax.frontend import nn

from qwen35_mobile.compile.model.quantized import (
    QuantizedEmbedding,
    QuantizedLinear,
    quantize_model,
)
from qwen35_mobile.compile.quantization import (
    GROUP_SIZE,
    QUANTIZATIONS,
    dequantize_weight,
    packed_shape,
    quantize_weight,
    scale_shape,
)
from qwen35_mobile.compile.schedule_cpu import cpu_pipeline, cpu_target

# The weight formats (q4f16_i8 stores q4f16_1's weights: tests/test_q8_gemv.py has its kernel).
FMTS = [name for name, q in QUANTIZATIONS.items() if q.quantized and not q.int8_activations]


def _model_dtype(fmt):
    return QUANTIZATIONS[fmt].model_dtype


def _weights(n, k, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)


# ---------------------------------------------------------------- numpy
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("k", [64, 70, 32 * 5 + 1])
def test_round_trip_error_bound(fmt, k):
    w = _weights(37, k)
    packed, scale = quantize_weight(w, fmt)
    assert (
        packed.shape == packed_shape(37, k) == (37, 4 * -(-k // 32)) and packed.dtype == np.uint32
    )
    assert scale.shape == scale_shape(37, k) and scale.dtype == np.dtype(_model_dtype(fmt))
    deq = dequantize_weight(packed, scale, fmt, k=k)
    assert deq.shape == (37, k) and deq.dtype == np.float32
    per_elem = np.repeat(scale.astype(np.float32), GROUP_SIZE, axis=1)[:, :k]
    if fmt == "q4f32_1":
        assert np.all(np.abs(w - deq) <= per_elem / 2 * (1 + 1e-6))
    else:
        # The weight is quantized as fp16 (as MLC does); the fp16 arithmetic of
        # w / scale + 7 and of (q - 7) * scale adds < 2% of a step.
        w16 = w.astype(np.float16).astype(np.float32)
        assert np.all(np.abs(w16 - deq) <= per_elem * 0.52)
    # scale = max|w| / 7 per group (on the real elements only for a padded group)
    pad = np.zeros((37, scale.shape[1] * GROUP_SIZE - k), np.float32)
    groups = np.concatenate([w.astype(_model_dtype(fmt)).astype(np.float32), pad], 1).reshape(
        37, -1, GROUP_SIZE
    )
    np.testing.assert_allclose(scale.astype(np.float32), np.abs(groups).max(-1) / 7, rtol=1e-3)
    # padding nibbles are stored as 0 (MLC's pack_weight)
    if k % 32:
        nib = (packed[:, :, None] >> (np.arange(8, dtype=np.uint32) * 4)) & 0xF
        assert np.all(nib.reshape(37, -1)[:, k:] == 0)


def test_packing_layout_by_hand():
    # One group with max |w| = 7 -> scale 1, q = w + 7 = i % 15.
    w = np.array([[(i % 15) - 7 for i in range(32)]], np.float32)
    for fmt in FMTS:
        packed, scale = quantize_weight(w, fmt)
        assert scale.tolist() == [[1.0]]
        # lowest nibble first: element 8j + i at bits 4i..4i+3 of word j
        assert packed.tolist() == [[0x76543210, 0x0EDCBA98, 0x87654321, 0x10EDCBA9]]
        np.testing.assert_array_equal(dequantize_weight(packed, scale, fmt), w)


def test_zero_group_and_chunked_rows(monkeypatch):
    import qwen35_mobile.compile.quantization as q

    w = _weights(10, 64)
    w[3, :32] = 0
    full = quantize_weight(w, "q4f16_1")
    monkeypatch.setattr(q, "ROW_CHUNK", 3)  # the row chunking does not change the result
    chunked = quantize_weight(w, "q4f16_1")
    for a, b in zip(full, chunked):
        np.testing.assert_array_equal(a, b)
    packed, scale = full
    assert scale[3, 0] == 0 and packed[3, 0] == 0x77777777
    assert np.all(dequantize_weight(packed, scale, "q4f16_1")[3, :32] == 0)


def test_bf16_input_overflow_and_fake_quantize():
    import ml_dtypes

    from qwen35_mobile.compile.quantization import fake_quantize, quantized_nbytes

    w = _weights(8, 64)
    bf = w.astype(ml_dtypes.bfloat16)
    for fmt in FMTS:  # a bf16 checkpoint tensor is quantized as is, chunk by chunk
        ref = quantize_weight(bf.astype(np.float32), fmt)
        for a, b in zip(quantize_weight(bf, fmt), ref):
            np.testing.assert_array_equal(a, b)
    fq = fake_quantize(w, "q4f16_1")
    np.testing.assert_array_equal(fq.astype(np.float16).astype(np.float32), fq)  # fp16-exact
    big = w.copy()
    big[2, 5] = 1e6
    with pytest.raises(OverflowError):
        quantize_weight(big, "q4f16_1")
    quantize_weight(big, "q4f32_1")
    assert quantized_nbytes((1024, 3584), "q4f16_1") == 1024 * 3584 // 2 + 1024 * 112 * 2


def _mlc_quantize_te(n, k, dtype):
    """MLC's ``GroupQuantize._quantize`` arithmetic (int4, uint32, group 32,
    NK layout), re-expressed in TE: max-abs and scale in the model dtype,
    round(w / scale + 7) clipped to [0, 14], nibbles packed by
    ``sum_r q[8j + r] << 4r`` with 0 past K."""
    w = te.placeholder((n, k), dtype, name="w")
    groups = -(-k // 32)
    r = te.reduce_axis((0, 32), name="r")
    max_abs = te.compute(
        (n, groups),
        lambda i, g: te.max(
            tirx.if_then_else(g * 32 + r < k, te.abs(w[i, g * 32 + r]), te.min_value(dtype)), axis=r
        ),
        name="max_abs",
    )
    scale = te.compute((n, groups), lambda i, g: max_abs[i, g] / tirx.const(7, dtype), name="scale")
    q = te.compute(
        (n, k),
        lambda i, j: tirx.min(
            tirx.max(
                tirx.round(w[i, j] / scale[i, j // 32] + tirx.const(7, dtype)), tirx.const(0, dtype)
            ),
            tirx.const(14, dtype),
        ).astype("uint32"),
        name="q",
    )
    r8 = te.reduce_axis((0, 8), name="r8")
    packed = te.compute(
        (n, groups * 4),
        lambda i, j: te.sum(
            tirx.if_then_else(
                j * 8 + r8 < k,
                q[i, j * 8 + r8] << (r8 * 4).astype("uint32"),
                tirx.const(0, "uint32"),
            ),
            axis=r8,
        ),
        name="packed",
    )
    return tvm.compile(te.create_prim_func([w, packed, scale]), target="llvm")


@pytest.mark.parametrize("fmt", FMTS)
def test_bit_exact_with_mlc_arithmetic(fmt):
    n, k = 64, 96 + 13
    dtype = _model_dtype(fmt)
    # magnitudes from 1e-6 (fp16-subnormal scales) to 1e2, with outliers
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((n, k)) * np.logspace(-6, 2, n)[:, None]).astype(np.float32)
    w[::5, ::7] *= 20
    func = _mlc_quantize_te(n, k, dtype)
    packed = tvm.runtime.tensor(np.zeros(packed_shape(n, k), np.uint32))
    scale = tvm.runtime.tensor(np.zeros(scale_shape(n, k), dtype))
    func(tvm.runtime.tensor(w.astype(dtype)), packed, scale)
    ours = quantize_weight(w, fmt)
    np.testing.assert_array_equal(ours[1], scale.numpy())
    # An all-zero group (scale 0) is 0/0 in MLC (NaN cast to uint: undefined);
    # we store q = 7.  Both dequantize to 0.  Every other word matches.
    nonzero = np.repeat(ours[1] != 0, 4, axis=1)
    assert nonzero.mean() > 0.9
    np.testing.assert_array_equal(ours[0][nonzero], packed.numpy()[nonzero])


# ---------------------------------------------------------------- nn modules
IN, OUT, ODD_IN, VOCAB = 64, 96, 80, 72


class _Small(nn.Module):
    def __init__(self, fmt):
        dtype = _model_dtype(fmt)
        self.res = QuantizedLinear(IN, OUT, fmt, "float32")  # fp32 out (residual)
        self.half = QuantizedLinear(
            ODD_IN, 40, fmt, dtype
        )  # 80 = 2.5 groups: padded, model-dtype out
        self.embed = QuantizedEmbedding(VOCAB, IN, fmt)

    def linear(self, x: nn.Tensor, y: nn.Tensor):
        return self.res(x), self.half(y)

    def take(self, ids: nn.Tensor):
        return self.embed(ids)

    def head(self, x: nn.Tensor):
        return self.embed.lm_head_forward(x)


def _export(fmt):
    dtype = _model_dtype(fmt)
    none = {"$": {"param_mode": "packed", "effect_mode": "none"}}
    spec = {
        "linear": {
            "x": nn.spec.Tensor([1, "m", IN], dtype),
            "y": nn.spec.Tensor([1, "m", ODD_IN], dtype),
            **none,
        },
        "take": {"ids": nn.spec.Tensor(["m"], "int32"), **none},
        "head": {"x": nn.spec.Tensor([1, "m", IN], dtype), **none},
    }
    return _Small(fmt).export_tvm(spec=spec)


@pytest.fixture(scope="module")
def target():
    return cpu_target({"kind": "llvm", "mcpu": "native"})


def _params(fmt):
    out = {}
    for name, (n, k) in {"res": (OUT, IN), "half": (40, ODD_IN), "embed": (VOCAB, IN)}.items():
        w = _weights(n, k, seed=len(name))
        packed, scale = quantize_weight(w, fmt)
        out[name] = (packed, scale, dequantize_weight(packed, scale, fmt, k=k))
    return out


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("pipeline", ["default", "cpu"])
def test_compiled_against_numpy(fmt, pipeline, target):
    dtype = _model_dtype(fmt)
    mod, named = _export(fmt)
    assert [(n, tuple(int(d) for d in p.shape), p.dtype) for n, p in named] == [
        ("res.weight", (OUT, IN // 8), "uint32"),
        ("res.scale", (OUT, IN // 32), dtype),
        ("half.weight", (40, 12), "uint32"),
        ("half.scale", (40, 3), dtype),
        ("embed.weight", (VOCAB, IN // 8), "uint32"),
        ("embed.scale", (VOCAB, IN // 32), dtype),
    ]
    if pipeline == "default":
        ex = tvm.compile(mod, tvm.target.Target({"kind": "llvm"}))
    else:
        ex = tvm.compile(mod, target, relax_pipeline=cpu_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    p = _params(fmt)
    args = [tvm.runtime.tensor(a) for name in ("res", "half", "embed") for a in p[name][:2]]
    rng = np.random.default_rng(1)
    for m in (1, 7):
        x = rng.standard_normal((1, m, IN)).astype(dtype)
        y = rng.standard_normal((1, m, ODD_IN)).astype(dtype)
        got_res, got_half = vm["linear"](tvm.runtime.tensor(x), tvm.runtime.tensor(y), args)
        ref = x.astype(np.float32) @ p["res"][2].T
        np.testing.assert_allclose(got_res.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        ref_half = (y.astype(np.float32) @ p["half"][2].T).astype(dtype)
        assert got_half.numpy().dtype == np.dtype(dtype)
        np.testing.assert_allclose(
            got_half.numpy().astype(np.float32), ref_half.astype(np.float32), rtol=2e-3, atol=1e-3
        )

        ids = rng.integers(0, VOCAB, m).astype(np.int32)
        taken = vm["take"](tvm.runtime.tensor(ids), args).numpy()
        assert taken.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(taken.astype(np.float32), p["embed"][2][ids])
        # out-of-range ids are clipped to the table, as the fp embedding's take(mode="clip")
        wild = np.array([-5, VOCAB, VOCAB + 1000, 3], np.int32)
        clipped = vm["take"](tvm.runtime.tensor(wild), args).numpy().astype(np.float32)
        np.testing.assert_array_equal(clipped, p["embed"][2][np.clip(wild, 0, VOCAB - 1)])

        logits = vm["head"](tvm.runtime.tensor(x), args).numpy()
        ref = x.astype(np.float32) @ p["embed"][2].T
        np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())

    # Bit exactness: one-hot rows return the dequantized weight itself, through
    # the GEMV (one row) and the GEMM (IN rows) branches alike.
    eye = np.eye(IN, dtype=dtype)[None]
    zeros = np.zeros((1, IN, ODD_IN), dtype)
    got, _ = vm["linear"](tvm.runtime.tensor(eye), tvm.runtime.tensor(zeros), args)
    np.testing.assert_array_equal(got.numpy()[0], p["res"][2].T)
    for k in (0, 13, IN - 1):
        got, _ = vm["linear"](
            tvm.runtime.tensor(eye[:, k : k + 1]), tvm.runtime.tensor(zeros[:, :1]), args
        )
        np.testing.assert_array_equal(got.numpy()[0, 0], p["res"][2][:, k])


def test_dequantize_fused_into_matmul_after_pipeline(target):
    mod, _ = _export("q4f16_1")
    lowered = cpu_pipeline(target)(mod)
    prims = {gv.name_hint: f for gv, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc)}
    kernels = {name: f for name, f in prims.items() if not name.startswith("shape_func")}
    readers = {
        weight: [
            name for name, f in kernels.items() if any(p.name.startswith(weight) for p in f.params)
        ]
        for weight in ("res_weight", "half_weight", "embed_weight")
    }
    # One function per linear reads the packed weight and the input, unpacks the
    # nibbles, and accumulates the product in fp32; no standalone dequantize.
    assert len(readers["res_weight"]) == 1 and len(readers["half_weight"]) == 1
    assert sorted("matmul" in n for n in readers["embed_weight"]) == [
        False,
        True,
    ]  # take + tied head
    for name, func in kernels.items():
        script = func.script()
        assert ">>" in script and "T.uint32(15)" in script, name
        if "matmul" in name:
            assert func.attrs["tirx.is_scheduled"], name
            assert "T.float32(0.0)" in script and "T.parallel" in script, name  # fp32 accumulator
    (half,) = readers["half_weight"]
    assert half.startswith("fused_") and "cast" in half  # the fp16 output cast fused in as well
    assert len(kernels) == 4, sorted(kernels)


def test_gpu_codegen_with_dlight():
    """dlight's GPU rules schedule the fused kernels (they have MLC's
    dequantize + NT_matmul form) and OpenCL code is generated (not run)."""
    from tvm.s_tir import dlight as dl

    mod, _ = _export("q4f16_1")
    target = tvm.target.Target({"kind": "opencl"}, host={"kind": "llvm"})
    with target:
        mod = tvm.transform.Sequential(
            [
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
                dl.ApplyDefaultSchedule(
                    dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Fallback()
                ),
            ]
        )(mod)
    kernels = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    assert len([n for n in kernels if "dequantize" in n and "matmul" in n]) == 3
    assert all("threadIdx" in f.script() for f in kernels.values())
    tvm.compile(mod, target)


# ---------------------------------------------------------------- the model
def _quantized_qwen(name, fmt):
    from qwen35_mobile.compile.config import preset
    from qwen35_mobile.compile.kernels import cpu_kernels
    from qwen35_mobile.compile.model.qwen35 import Qwen35LM

    class _LM(Qwen35LM):
        # The integration qwen35.py needs for a tied head (see the report).
        def _logits(self, x):
            if self.config.tie_word_embeddings and hasattr(self.embed_tokens, "lm_head_forward"):
                return self.embed_tokens.lm_head_forward(self.norm(x))
            return super()._logits(x)

    target = cpu_target({"kind": "llvm", "mcpu": "native"})
    c = preset(name)
    model = _LM(c, _model_dtype(fmt), target, kernels=cpu_kernels(target))
    before = {n: (tuple(int(d) for d in p.shape), p.dtype) for n, p in model.named_parameters()}
    model = quantize_model(model, fmt)
    mod, named = model.export_tvm(spec=model.get_default_spec())
    return c, before, model, mod, {n: (tuple(int(d) for d in p.shape), p.dtype) for n, p in named}


@pytest.mark.parametrize("name,fmt", [("tiny", "q4f16_1"), ("tiny-untied", "q4f32_1")])
def test_quantize_tiny_qwen(name, fmt):
    from qwen35_mobile.compile.model.qwen35 import Linear

    c, before, model, mod, after = _quantized_qwen(name, fmt)
    dtype = _model_dtype(fmt)
    qmap = model.quantize_map.param_map
    linears = [n for n in before if re.search(r"(_proj(_[a-z]+)?|^lm_head)\.weight$", n)]
    assert set(qmap) == set(linears) | {"embed_tokens.weight"}
    assert ("lm_head.weight" in qmap) == (not c.tie_word_embeddings)
    expected = {}
    for orig, (shape, dt) in before.items():
        if orig in qmap:
            assert dt == dtype
            packed, scale = qmap[orig]
            assert (packed, scale) == (orig, orig[: -len("weight")] + "scale")
            expected[packed] = (packed_shape(*shape), "uint32")
            expected[scale] = (scale_shape(*shape), dtype)
        else:
            expected[orig] = (shape, dt)  # A_log, dt_bias, norms, conv: untouched
    assert after == expected
    lin = model.layers[c.linear_attention_layers[0]].linear_attn
    assert after["layers.0.linear_attn.A_log"] == ((c.linear_num_value_heads,), "float32")
    assert after["layers.0.linear_attn.dt_bias"] == ((c.linear_num_value_heads,), "float32")
    assert (
        isinstance(lin.out_proj, QuantizedLinear) and lin.out_proj.out_dtype == "float32"
    )  # residual
    assert lin.in_proj_qkv.out_dtype == dtype
    assert not any(isinstance(m, (Linear, nn.Linear, nn.Embedding)) for _, m in _modules(model))
    # The converter side: QuantizeMap.convert yields exactly the exported tensors.
    shape = before["layers.0.mlp.down_proj.weight"][0]
    out = model.quantize_map.convert("layers.0.mlp.down_proj.weight", _weights(*shape))
    assert {n: (a.shape, str(a.dtype)) for n, a in out} == {
        n: after[n] for n in ("layers.0.mlp.down_proj.weight", "layers.0.mlp.down_proj.scale")
    }
    # The converter's plan: original tensors in export order, each quantized
    # one once (cast to the model dtype) writing its packed weight and scale.
    plan = model.quantize_map.sources(after)
    assert [w for *_, written in plan for w in written] == list(after)
    assert {src: (shape, dt) for src, shape, dt, _ in plan} == {
        n: (s, dtype if n in qmap else d) for n, (s, d) in before.items()
    }
    norm = np.ones(before["norm.weight"][0], np.float32)
    assert model.quantize_map.convert("norm.weight", norm)[0][0] == "norm.weight"
    assert "decode" in [gv.name_hint for gv in mod.get_global_vars()]


def test_quantized_tiny_qwen_builds_fused():
    """The whole tiny model builds with cpu_pipeline: no standalone dequantize
    kernel, every linear's weight unpacked inside its matmul; ``embed`` runs on
    converted weights and returns the dequantized rows."""
    _, before, model, mod, after = _quantized_qwen("tiny", "q4f16_1")
    target = cpu_target({"kind": "llvm", "mcpu": "native"})
    lowered = cpu_pipeline(target)(mod)
    names = [gv.name_hint for gv, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert not [
        n for n in names if n.startswith("dequantize") and "matmul" not in n and "take" not in n
    ]
    assert (
        len([n for n in names if "dequantize" in n and "matmul" in n]) >= 6
    )  # q/k/v/o, in_proj_*, out, mlp, head

    rng = np.random.default_rng(0)
    converted = {}
    for name, (shape, dtype) in before.items():
        array = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        converted.update(
            model.quantize_map.convert(name, array.astype(dtype) if dtype == "float32" else array)
        )
    params = [
        tvm.runtime.tensor(np.ascontiguousarray(converted[n]).astype(after[n][1])) for n in after
    ]
    ex = tvm.compile(mod, target, relax_pipeline=cpu_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    ids = np.array([0, 5, 248319], np.int32)
    rows = vm["embed"](tvm.runtime.tensor(ids), params).numpy()
    table = dequantize_weight(
        converted["embed_tokens.weight"], converted["embed_tokens.scale"], "q4f16_1"
    )
    np.testing.assert_array_equal(rows.astype(np.float32), table[ids])


def _modules(module, prefix=""):
    for key, value in vars(module).items():
        if isinstance(value, nn.ModuleList):
            for i, sub in enumerate(value):
                yield f"{prefix}{key}.{i}", sub
                yield from _modules(sub, f"{prefix}{key}.{i}.")
        elif isinstance(value, nn.Module):
            yield f"{prefix}{key}", value
            yield from _modules(value, f"{prefix}{key}.")


# ---------------------------------------------------------------- the registry
def test_registry_entries_and_unknown_name():
    from qwen35_mobile.compile.quantization import get
    from qwen35_mobile.errors import UserError

    assert {n: (q.model_dtype, q.quantized) for n, q in QUANTIZATIONS.items()} == {
        "q0f32": ("float32", False),
        "q0f16": ("float16", False),
        "q4f16_1": ("float16", True),
        "q4f32_1": ("float32", True),
        "q4f16_i8": ("float16", True),
    }
    assert all(q.name == n and q.description for n, q in QUANTIZATIONS.items())
    assert (
        get("q4f16_1") is QUANTIZATIONS["q4f16_1"]
        and get(QUANTIZATIONS["q0f16"]) is QUANTIZATIONS["q0f16"]
    )
    with pytest.raises(
        UserError,
        match=r"unknown quantization 'q3f7'; known: q0f32, q0f16, q4f16_1, q4f32_1, q4f16_i8",
    ):
        get("q3f7")
    with pytest.raises(ValueError, match="not a group quantization"):
        quantize_weight(_weights(4, 32), "q0f16")


def test_registry_keeps_dtypes_stored_and_converts():
    lin, emb = "layers.0.mlp.down_proj.weight", "embed_tokens.weight"
    kept = {
        "layers.0.linear_attn.A_log": (4,),
        "layers.0.linear_attn.dt_bias": (4,),
        "norm.weight": (64,),
        "layers.0.linear_attn.conv1d.weight": (96, 1, 4),
        "layers.3.self_attn.q_norm.weight": (32,),
    }
    for name, q in QUANTIZATIONS.items():
        for param, shape in kept.items():
            assert q.keeps(param, shape)
            want = "float32" if param.endswith(("A_log", "dt_bias")) else q.model_dtype
            assert q.stored(param, shape) == [(param, shape, want)], (name, param)
        assert (
            q.keeps(lin, (64, 80))
            == q.keeps(emb, (1000, 64))
            == q.keeps("lm_head.weight", (1000, 64))
            == (not q.quantized)
        )
    q = QUANTIZATIONS["q4f16_1"]
    assert q.stored(lin, (64, 80)) == [
        (lin, packed_shape(64, 80), "uint32"),
        ("layers.0.mlp.down_proj.scale", scale_shape(64, 80), "float16"),
    ]
    assert q.nbytes(lin, (64, 80)) == 64 * 12 * 4 + 64 * 3 * 2
    w = _weights(64, 80)
    out = q.convert(lin, w)
    assert [(n, a.shape, str(a.dtype)) for n, a in out] == q.stored(lin, w.shape)
    np.testing.assert_array_equal(out[0][1], quantize_weight(w, q)[0])
    norm = np.ones(64, np.float32)
    assert q.convert("norm.weight", norm) == [
        ("norm.weight", norm)
    ]  # kept: as it is, cast by the converter
    # The reference's values: dequantized, fp16-rounded, or untouched.
    np.testing.assert_array_equal(
        q.reference_weight(lin, w), dequantize_weight(*quantize_weight(w, q), q, k=80)
    )
    a_log = np.full(4, 0.1, np.float32)
    assert QUANTIZATIONS["q0f16"].reference_weight("layers.0.linear_attn.A_log", a_log) is a_log
    half = QUANTIZATIONS["q0f16"].reference_weight(lin, w)
    np.testing.assert_array_equal(half, w.astype(np.float16).astype(np.float32))
    assert QUANTIZATIONS["q0f32"].reference_weight(lin, w) is w


@pytest.mark.parametrize("name", ["tiny", "tiny-untied"])
def test_parameters_are_what_the_registry_stores(name):
    """Every quantization's parameter list is the registry's ``stored`` of the
    unquantized model's, and the sizes follow from the registry alone."""
    from qwen35_mobile.compile import pipeline
    from qwen35_mobile.compile.config import preset

    originals = pipeline.parameters(preset(name), "q0f32").params
    for quant, q in QUANTIZATIONS.items():
        exported = pipeline.parameters(preset(name), quant)
        assert exported.quant is q and exported.dtype == q.model_dtype
        assert exported.params == [s for n, shape, _ in originals for s in q.stored(n, shape)]
        assert (exported.quantize_map is not None) == q.quantized
        nbytes = sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d in exported.params)
        assert nbytes == sum(q.nbytes(n, shape) for n, shape, _ in originals)


def test_a_model_the_registry_does_not_describe_is_refused(monkeypatch):
    from qwen35_mobile.compile import pipeline, quantization
    from qwen35_mobile.compile.config import preset

    monkeypatch.setattr(quantization, "FP32_PARAMS", ("A_log",))  # forgets dt_bias
    with pytest.raises(RuntimeError, match=r"dt_bias.*FP32_PARAMS"):
        pipeline.parameters(preset("tiny"), "q0f16")


def test_export_builds_the_model_once(monkeypatch):
    from qwen35_mobile.compile import pipeline
    from qwen35_mobile.compile.config import preset
    from qwen35_mobile.compile.model import qwen35
    from qwen35_mobile.targets import get_target

    built = []

    class Counting(qwen35.Qwen35LM):
        def __init__(self, *args, **kwargs):
            built.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(qwen35, "Qwen35LM", Counting)
    exported = pipeline.export(preset("tiny"), "q4f16_1", get_target("host"))
    assert len(built) == 1
    assert exported.params == pipeline.parameters(preset("tiny"), "q4f16_1", vision=False).params
    assert exported.quantize_map.param_map["embed_tokens.weight"] == [
        "embed_tokens.weight",
        "embed_tokens.scale",
    ]
