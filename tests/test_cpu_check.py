"""No silent fallback on the CPU (issue 13, item 3): the scheduled kernels lower
to parallel vector code, on every CPU target we build, or the build fails.

* The schedules size their vectors from the target's features (AVX2 256 bits,
  AVX-512 512, NEON 128), not from the machine that builds.
* At the real Qwen3.5-0.8B shape, for host AVX2, host AVX-512, aarch64 NEON and
  aarch64 + fullfp16, the quantized GEMV/GEMM, the gated delta rule and the
  causal convolution lower to parallel vector code (looked at after TVM's
  ``VectorizeLoop``, where a scalarised loop has no vector access left), and the
  only exemptions are the vision kernels ``cpu_check.EXEMPTIONS`` names.
* The decode GEMV's machine code uses the target's registers: zmm FMAs on
  AVX-512, ymm and no zmm on AVX2, ``fmla .4s`` on aarch64.
* Negative controls: a kernel marked vectorised whose loop TVM scalarises, and
  a large kernel left serial, fail the check naming them; an exemption waives
  only what it names.
"""

from __future__ import annotations

import re

import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import nn
from tvm.script import tirx as T
from tvm.target import Target

from qwen35_mobile.compile.cpu_check import (
    EXEMPTIONS,
    Exemption,
    inspect_kernels,
    verify_cpu_kernels,
)
from qwen35_mobile.compile.schedule_cpu import (
    UnscheduledKernelError,
    cpu_pipeline,
    schedule_for_cpu,
    vector_bits,
)

X86 = {"AVX2": "haswell", "AVX-512": "skylake-avx512"}


def _x86(isa: str) -> Target:
    return Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": X86[isa]})


def _aarch64(fp16: bool) -> Target:
    mattr = ["+neon", "+fullfp16"] if fp16 else ["+neon"]
    return Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": mattr})


@pytest.mark.parametrize(
    ("target", "bits"),
    [
        ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}, 256),
        ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3"}, 256),
        ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"}, 512),
        ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"}, 512),
        ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}, 128),
        ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, 128),
    ],
)
def test_vector_width_follows_the_target_not_the_build_machine(target, bits):
    assert vector_bits(Target(target)) == bits


# -- the real 0.8B shape, per CPU target ---------------------------------------
CPU_TARGETS = {
    "host AVX2": ("host", "q4f16_1", lambda: _x86("AVX2")),
    "host AVX-512": ("host", "q4f16_1", lambda: _x86("AVX-512")),
    "aarch64 NEON": ("aarch64", "q4f32_1", lambda: _aarch64(False)),
    "aarch64 + fullfp16": ("aarch64", "q4f16_1", lambda: _aarch64(True)),
}


def _scheduled_08b(preset_name: str, quant: str, target: Target) -> tvm.IRModule:
    """The 0.8B text decoder (shapes only) scheduled for ``target``, as cpu_pipeline does."""
    from qwen35_mobile.compile import pipeline
    from qwen35_mobile.compile.config import preset as model_preset
    from qwen35_mobile.targets import get_target

    exported = pipeline.export(model_preset("qwen3.5-0.8b"), quant, get_target(preset_name))
    with target:
        fused = tvm.transform.Sequential(
            [relax.transform.FuseTransposeMatmul()] + relax.pipeline.legalize_passes(target)
        )(exported.mod)
    return schedule_for_cpu(fused, target)


@pytest.mark.parametrize("which", list(CPU_TARGETS))
def test_real_kernels_lower_to_parallel_vector_code(which):
    preset_name, quant, make_target = CPU_TARGETS[which]
    target = make_target()
    scheduled = _scheduled_08b(preset_name, quant, target)
    codes = inspect_kernels(scheduled, target)
    pinned = {
        # A symbolic row count gives two kernels, name[gemv] and name[gemm], each checked.
        "quantized GEMV/GEMM": [n for n in codes if "dequantize_NT_matmul" in n],
        "gated delta rule": [n for n in codes if "gated_delta_rule" in n],
        "causal conv": [n for n in codes if "causal_conv" in n],
    }
    for kind, names in pinned.items():
        assert names, f"{which}: no {kind} kernel in the 0.8B module"
        for name in names:
            code = codes[name]
            assert code.vector_accesses > 0 and code.parallel, f"{which}: {kind} {name}: {code}"
    # 24 layers' projections share ~20 kernels, the LM head among them; prefill's
    # matmuls switch between a GEMV and a GEMM schedule at run time, both checked.
    gemms = [n for n in pinned["quantized GEMV/GEMM"] if n.endswith("[gemm]")]
    assert len(pinned["quantized GEMV/GEMM"]) >= 20 and len(gemms) >= 5
    # Nothing else is allowed to be scalar (text-only module: no vision exemption applies).
    assert [n for n, c in codes.items() if c.missing()] == []
    verify_cpu_kernels(scheduled, target)


# -- machine code of the decode GEMV -------------------------------------------
def _gemv_asm(target: Target, quant: str) -> str:
    """Assembly of the q4 decode GEMV (1 x 1024 @ 3584 x 1024) built for ``target``."""
    from qwen35_mobile.compile.model.quantized import QuantizedLinear

    dtype = "float16" if quant == "q4f16_1" else "float32"

    class Layer(nn.Module):
        def __init__(self):
            self.proj = QuantizedLinear(1024, 3584, quant, "float32")

        def decode(self, x: nn.Tensor):
            return self.proj(x)

    spec = {
        "decode": {
            "x": nn.spec.Tensor([1, 1, 1024], dtype),
            "$": {"param_mode": "packed", "effect_mode": "none"},
        }
    }
    mod, _ = Layer().export_tvm(spec=spec)
    ex = tvm.compile(mod, target, relax_pipeline=cpu_pipeline(target))
    asm = ex.mod.imports[0].inspect_source("asm") if ex.mod.imports else ""
    asm = asm or ex.mod.inspect_source("asm")
    start = asm.index("dequantize_NT_matmul")
    return asm[start:]


@pytest.mark.parametrize(
    ("which", "quant", "must", "must_not"),
    [
        ("AVX-512", "q4f16_1", r"vfmadd\d+ps\s+%zmm", None),
        ("AVX2", "q4f16_1", r"vfmadd\d+ps\s+%ymm", r"%zmm"),
        ("aarch64 NEON", "q4f32_1", r"fmla\s+v\d+\.4s", None),
        ("aarch64 + fullfp16", "q4f16_1", r"fmla\s+v\d+\.4s", None),
    ],
)
def test_decode_gemv_uses_the_target_vector_registers(which, quant, must, must_not):
    target = _x86(which) if which in X86 else _aarch64("fullfp16" in which)
    asm = _gemv_asm(target, quant)
    assert len(re.findall(must, asm)) >= 8, f"{which}: no {must!r} in the GEMV"
    if must_not:
        assert not re.search(must_not, asm), f"{which}: {must_not!r} in an AVX2 GEMV"


# -- negative controls ---------------------------------------------------------
@T.prim_func(s_tir=True)
def _scalarised(a: T.Buffer((4096, 64), "float32"), b: T.Buffer((4096, 64), "float32")):
    # Marked vectorised, but the select differs between lanes: VectorizeLoop
    # turns the loop back into a serial one.
    T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
    for i in T.parallel(4096):
        for j in T.vectorized(64):
            with T.sblock("rotate"):
                vi, vj = T.axis.remap("SS", [i, j])
                b[vi, vj] = T.if_then_else(
                    vj < 32, a[vi, (vj * 7) % 64] * T.float32(-1), a[vi, vj - 32]
                )


@T.prim_func(s_tir=True)
def _serial(a: T.Buffer((4096, 64), "float32"), b: T.Buffer((4096, 64), "float32")):
    # Vectorised but never parallel, and large.
    T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
    for i in range(4096):
        for j in T.vectorized(64):
            with T.sblock("scale"):
                vi, vj = T.axis.remap("SS", [i, j])
                b[vi, vj] = a[vi, vj] * T.float32(2)


@T.prim_func(s_tir=True)
def _good(a: T.Buffer((4096, 64), "float32"), b: T.Buffer((4096, 64), "float32")):
    T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
    for i in T.parallel(4096):
        for j in T.vectorized(64):
            with T.sblock("scale"):
                vi, vj = T.axis.remap("SS", [i, j])
                b[vi, vj] = a[vi, vj] * T.float32(2)


def test_a_scalarised_or_serial_kernel_fails_the_build_naming_it():
    target = _x86("AVX2")
    verify_cpu_kernels(tvm.IRModule({"good_kernel": _good}), target)  # positive control
    mod = tvm.IRModule({"rotate_kernel": _scalarised, "serial_kernel": _serial, "ok": _good})
    with pytest.raises(UnscheduledKernelError) as err:
        verify_cpu_kernels(mod, target)
    message = str(err.value)
    assert "rotate_kernel (vector)" in message and "serial_kernel (parallel)" in message
    assert message.startswith("2 scheduled CPU kernel(s)")  # not "ok"
    # The TIR still says "vectorized" for the scalarised one: only the lowered code tells.
    assert tvm.tirx.ForKind.VECTORIZED in _loop_kinds(_scalarised)


def test_an_exemption_waives_only_what_it_names():
    target = _x86("AVX2")
    mod = tvm.IRModule({"rotate_kernel": _scalarised, "serial_kernel": _serial})
    vector_only = Exemption("test", frozenset({"vector"}), lambda name, _f: True)
    with pytest.raises(UnscheduledKernelError, match=r"serial_kernel \(parallel\)") as err:
        verify_cpu_kernels(mod, target, [vector_only])
    assert "rotate_kernel" not in str(err.value)
    both = Exemption("test", frozenset({"vector", "parallel"}), lambda name, _f: True)
    verify_cpu_kernels(mod, target, [both])
    # The shipped exemptions cover only vision kernels (the symbolic patch count).
    assert all(not e.applies("rotate_kernel", _scalarised) for e in EXEMPTIONS)


def _loop_kinds(func) -> set:
    import tvm_ffi

    kinds = set()
    tvm_ffi.structural_walk(func.body, [(tvm.tirx.For, lambda loop: kinds.add(loop.kind))])
    return kinds
