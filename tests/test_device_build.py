"""Device builds of the tiny model: Android (OpenCL), iOS (Metal), WebGPU (WGSL), CUDA.

Library only (no weights), built once per module and shared by the tests.  No
GPU is needed: the libraries are cross-compiled and inspected (object files,
embedded device source, manifest).  The TVM defects worked around in
compile/schedule_gpu.py are pinned here too.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
from conftest import need, need_tool

from qwen35_mobile.targets import PRESETS, get_target

STATIC_TARGETS = ["android", "ios", "webgpu"]

# Kernel names that must appear in the device source of every build: the GPU
# Gated DeltaNet (recurrent + the three chunked kernels), the causal conv, and
# paged-KV-cache attention.
DELTANET_KERNELS = [
    "gated_delta_rule_kernel",
    "gated_delta_rule_chunk_prep_kernel",
    "gated_delta_rule_chunk_solve_kernel",
    "gated_delta_rule_chunk_scan_kernel",
    "causal_conv1d_kernel",
]
ATTENTION_KERNELS = ["batch_prefill_paged_kv_kernel", "batch_decode_paged_kv_kernel"]

# How each device language declares a kernel, and a line its source always has.
LANGUAGE = {
    "android": (b"__kernel void ", b"__global"),
    "ios": (b"kernel void ", b"#include <metal_stdlib>"),
    "webgpu": (b"@compute", b"@workgroup_size"),
}


@pytest.fixture(scope="module")
def device_build(tmp_path_factory):
    """device_build(target, quant) -> artifact directory of the tiny model."""
    from qwen35_mobile.compile.compiler import compile_model

    root = tmp_path_factory.mktemp("device")
    made: dict[tuple[str, str], Path] = {}

    def make(target: str, quant: str) -> Path:
        if (target, quant) not in made:
            out = root / f"tiny-{target}-{quant}"
            # model.wasm only where a test reads it (linking costs ~20 s)
            wasm = (target, quant) == ("webgpu", "q0f32")
            compile_model("tiny", target, quant, out, progress=lambda _: None, wasm=wasm)
            made[target, quant] = out
        return made[target, quant]

    return make


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _object_kind(data: bytes) -> str:
    if data[:4] == b"\x7fELF":
        machine = struct.unpack_from("<H", data, 18)[0]
        return {183: "elf-aarch64", 62: "elf-x86_64"}.get(machine, f"elf-{machine}")
    if data[:4] == b"\xcf\xfa\xed\xfe":
        cputype = struct.unpack_from("<I", data, 4)[0]
        return "macho-arm64" if cputype == 0x0100000C else f"macho-{cputype:#x}"
    if data[:4] == b"\0asm":
        return "wasm"
    return "unknown"


OBJECT_KIND = {"android": "elf-aarch64", "ios": "macho-arm64", "webgpu": "wasm"}


# --------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["android", "ios", "webgpu", "cuda"])
def test_gpu_presets_are_data(name):
    preset = get_target(name)
    assert preset.is_gpu
    target = preset.tvm_target()
    # The device limits written in the preset's target dict reach the TVM target.
    assert int(target.attrs["max_num_threads"]) == preset.target["max_num_threads"] > 0
    assert (
        int(target.attrs["max_shared_memory_per_block"])
        == preset.target["max_shared_memory_per_block"]
        > 0
    )
    assert str(target.host.attrs["mtriple"]) == preset.host_triple
    if preset.output.endswith(".tar"):  # static system library; tvmjs opens it without a prefix
        assert preset.system_lib_prefix == ("" if name == "webgpu" else "qwen35_")
    assert set(PRESETS) >= {"host", "android", "ios", "webgpu", "cuda"}


def test_preset_triples():
    assert get_target("android").host_triple == "aarch64-linux-android"
    assert get_target("android").target["kind"] == "opencl"
    assert get_target("ios").host_triple == "arm64-apple-darwin"
    assert get_target("ios").target["kind"] == "metal"
    assert get_target("webgpu").host_triple.startswith("wasm32")
    assert get_target("cuda").output == "model.so"


# --------------------------------------------------------------------------
# Builds
# --------------------------------------------------------------------------
BUILDS = [(t, q) for t in STATIC_TARGETS for q in ("q0f32", "q0f16")]


@pytest.mark.parametrize("target,quant", BUILDS)
def test_static_library(device_build, target, quant):
    out = device_build(target, quant)
    preset = get_target(target)
    manifest = (out / "manifest.json").read_text()
    import json

    manifest = json.loads(manifest)
    assert manifest["target"] == target
    assert manifest["tvm_target"]["kind"] == preset.target["kind"]
    assert manifest["quantization"] == quant
    assert manifest["library"] == "model.tar"
    assert manifest["library_bytes"] == (out / "model.tar").stat().st_size
    assert "compile_seconds" not in manifest  # build facts: build-info.json, outside the identity
    assert json.loads((out / "build-info.json").read_text())["library_compile_seconds"] > 0
    assert not (out / "tensor-cache.json").exists()  # library only

    members = _members(out / "model.tar")
    prefix = manifest["system_lib_prefix"]
    # per model and quantization, so that two models link into one app
    assert prefix == ("" if target == "webgpu" else f"qwen35_tiny_{quant}_")
    devc = f"{prefix}devc.o"
    assert set(members) == {"lib0.o", devc}, sorted(members)
    for name, data in members.items():
        assert _object_kind(data) == OBJECT_KIND[target], name

    source = members[devc]
    declare, marker = LANGUAGE[target]
    assert marker in source
    for kernel in DELTANET_KERNELS + ATTENTION_KERNELS:
        assert declare in source
        assert f"{prefix}{kernel}".encode() in source, f"{kernel} missing from the {target} source"
    if quant == "q0f16" and target == "webgpu":
        assert b"enable f16;" in source
    # Functions are registered under the system-lib prefix.
    assert f"{prefix}__tvm_ffi__library_bin".encode() in source  # the VM executable
    assert f"__tvm_ffi_{prefix}gated_delta_rule".encode() in members["lib0.o"]


def test_cuda_library(device_build):
    """No nvcc needed (the set-up installs none; this test ran with none on
    PATH): TVM 0.27's wheel has no CUDA runtime, so the library carries the
    kernels' CUDA C source (not PTX or cubin)."""
    out = device_build("cuda", "q0f32")
    data = (out / "model.so").read_bytes()
    assert data[:4] == b"\x7fELF"
    for kernel in DELTANET_KERNELS + ATTENTION_KERNELS:
        assert re.search(
            rb"__global__ void __launch_bounds__\(\d+\) " + kernel.encode() + rb"\(", data
        ), kernel


def test_bindings_refuse_device_libraries(device_build):
    from qwen35_mobile.bindings.contract import check_contract
    from qwen35_mobile.errors import UserError

    with pytest.raises(UserError, match="built for target 'android'"):
        check_contract(device_build("android", "q0f32"))


# --------------------------------------------------------------------------
# Schedules: every kernel bound to threads, no big unrolls
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported_android():
    from qwen35_mobile.compile import pipeline
    from qwen35_mobile.compile.config import preset

    return pipeline.export(preset("tiny"), "q0f16", get_target("android"))


def test_unroll_is_capped(exported_android):
    from qwen35_mobile.compile.schedule_gpu import (
        MAX_UNROLL,
        gpu_pipeline,
        unroll_steps,
        unscheduled_kernels,
    )

    target = get_target("android").tvm_target()
    with target:
        uncapped = gpu_pipeline(target, max_unroll=1 << 20)(exported_android.mod)
        capped = gpu_pipeline(target)(exported_android.mod)
    # dlight asks for unrolls of 64-256 steps; none survives the cap.
    assert max(steps for _, steps in unroll_steps(uncapped)) > MAX_UNROLL
    steps = list(unroll_steps(capped))
    assert steps and max(s for _, s in steps) <= MAX_UNROLL
    assert unscheduled_kernels(capped) == []


def test_cap_unroll_rewrites_loops():
    import tvm
    from tvm.script import tirx as T

    from qwen35_mobile.compile.schedule_gpu import cap_unroll, unroll_steps

    @T.prim_func(s_tir=True)
    def func(A: T.Buffer((64, 64), "float32")):
        for i in T.thread_binding(64, thread="threadIdx.x"):
            for j in T.unroll(64):
                A[i, j] = A[i, j] + T.float32(1)
            for j in T.serial(
                64, annotations={"pragma_auto_unroll_max_step": 256, "pragma_unroll_explicit": 1}
            ):
                A[i, j] = A[i, j] * T.float32(2)

    mod = tvm.IRModule({"main": func})
    assert sorted(s for _, s in unroll_steps(mod)) == [64, 256]
    capped = cap_unroll(mod, 16)
    assert sorted(s for _, s in unroll_steps(capped)) == [16]


def test_unscheduled_kernel_is_named():
    import tvm
    from tvm.script import tirx as T

    from qwen35_mobile.compile.schedule_gpu import UnscheduledKernelError, check_scheduled

    @T.prim_func(s_tir=True)
    def bound(A: T.Buffer((64,), "float32")):
        for i in T.thread_binding(64, thread="threadIdx.x"):
            A[i] = A[i] + T.float32(1)

    @T.prim_func(s_tir=True)
    def serial_kernel(A: T.Buffer((64,), "float32")):
        for i in range(64):
            A[i] = A[i] + T.float32(1)

    check_scheduled(tvm.IRModule({"bound": bound}))
    with pytest.raises(UnscheduledKernelError, match="serial_kernel"):
        check_scheduled(tvm.IRModule({"bound": bound, "serial_kernel": serial_kernel}))


# --------------------------------------------------------------------------
# Known TVM 0.27 defects and their workarounds
# --------------------------------------------------------------------------
def _rule_names(kind: str) -> list[str]:
    from tvm.target import Target

    from qwen35_mobile.compile.schedule_gpu import dlight_rules

    return [rule.name for rule in dlight_rules(Target({"kind": kind}))]


def test_metal_skips_dlight_matmul_only_there():
    assert "Matmul" not in _rule_names("metal")
    for kind in ("opencl", "webgpu"):
        assert _rule_names(kind)[0] == "Matmul", (
            kind
        )  # the other targets keep the fast prefill matmul
    # CUDA keeps it for fp32 kernels only (it segfaults in tensorize on fp16 ones)
    assert _rule_names("cuda")[0] == "_NotFloat16"
    assert "Fallback" in _rule_names("metal") and "GEMV" in _rule_names("metal")


def test_cuda_matmul_declines_float16_only():
    from tvm import te
    from tvm.target import Target

    from qwen35_mobile.compile.schedule_gpu import dlight_rules

    def matmul(dtype):
        a = te.placeholder((256, 256), dtype, name="a")
        b = te.placeholder((256, 256), dtype, name="b")
        k = te.reduce_axis((0, 256), name="k")
        c = te.compute(
            (256, 256),
            lambda i, j: te.sum(a[i, k].astype("float32") * b[j, k].astype("float32"), axis=k),
            name="c",
        )
        return te.create_prim_func([a, b, c])

    target = Target({"kind": "cuda", "arch": "sm_90"})
    rule = dlight_rules(target)[0]
    assert rule.apply(matmul("float16"), target, False) is None
    assert rule.apply(matmul("float32"), target, False) is not None


def test_rmsnorm_rule_only_where_8_lane_vectors_exist():
    assert "RMSNorm" not in _rule_names("metal")
    assert "RMSNorm" not in _rule_names("webgpu")
    assert "RMSNorm" in _rule_names("opencl") and "RMSNorm" in _rule_names("cuda")


_MATMUL_SCRIPT = textwrap.dedent(
    """
    import sys
    import tvm
    from tvm import te
    from tvm.s_tir import dlight as dl
    from tvm.target import Target

    a = te.placeholder((128, 64), "float32", name="a")
    b = te.placeholder((256, 64), "float32", name="b")
    k = te.reduce_axis((0, 64), name="k")
    c = te.compute((128, 256), lambda i, j: te.sum(a[i, k] * b[j, k], axis=k), name="c")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b, c])})
    with Target({"kind": sys.argv[1]}):
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul())(mod)
    print("scheduled")
    """
)


def test_dlight_matmul_still_crashes_on_metal(tmp_path):
    """The defect the Metal workaround exists for.  When a TVM upgrade fixes it,
    this test fails: then drop "metal" from MATMUL_BROKEN_KINDS."""
    script = tmp_path / "matmul.py"
    script.write_text(_MATMUL_SCRIPT)
    ok = subprocess.run(
        [sys.executable, str(script), "opencl"], capture_output=True, text=True, timeout=300
    )
    assert ok.returncode == 0 and "scheduled" in ok.stdout, ok.stderr[-2000:]
    metal = subprocess.run(
        [sys.executable, str(script), "metal"], capture_output=True, text=True, timeout=300
    )
    assert metal.returncode != 0, "dl.gpu.Matmul no longer crashes for metal: drop the workaround"


def test_dlight_rmsnorm_still_breaks_metal():
    """dl.gpu.RMSNorm's 8-lane fp32 vectors do not exist in Metal.  When this
    test fails, TVM handles it: drop "metal" from RMSNORM_BROKEN_KINDS."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend import nn
    from tvm.s_tir import dlight as dl
    from tvm.target import Target

    class Norm(nn.Module):
        def forward(self, x: nn.Tensor, w: nn.Tensor):
            return nn.op.rms_norm(x, w, axes=[-1]).astype("float16")  # as the model's norms

    mod, _ = Norm().export_tvm(
        spec={
            "forward": {
                "x": nn.spec.Tensor([1, "n", 1024], "float32"),
                "w": nn.spec.Tensor([1024], "float32"),
            }
        }
    )
    target = Target({"kind": "metal", "host": {"kind": "llvm", "mtriple": "arm64-apple-darwin"}})
    with target:
        mod = tvm.transform.Sequential(
            [
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
                dl.ApplyDefaultSchedule(dl.gpu.RMSNorm()),
            ]
        )(mod)
    tir = tvm.IRModule(
        {
            gv: f.with_attr("global_symbol", gv.name_hint)
            for gv, f in mod.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc)
        }
    )
    assert all(f.attrs.get("tirx.is_scheduled") for f in tir.functions.values())
    with pytest.raises(Exception, match="float32x8"):
        tvm.tirx.build(tir, target=target)


# --------------------------------------------------------------------------
# WebGPU: model.wasm is the build linked with TVM's web runtime (bindings/web_runtime)
# --------------------------------------------------------------------------
def test_link_wasm_explains_missing_web_runtime(device_build, tmp_path, monkeypatch):
    from qwen35_mobile.compile.wasm import link_wasm
    from qwen35_mobile.errors import UserError

    tar = device_build("webgpu", "q0f32") / "model.tar"  # built (and linked) first
    monkeypatch.delenv("TVM_HOME", raising=False)
    monkeypatch.setenv("QWEN35_WEB_RUNTIME", str(tmp_path / "no-runtime"))
    with pytest.raises(UserError, match="web runtime") as err:
        link_wasm(tar, tmp_path / "m.wasm", tmp_path)
    message = str(err.value)
    assert all(p in message for p in ("wasm_runtime", "tvmjs_support", "webgpu_runtime"))
    assert "scripts/setup_emulators.sh web-runtime" in message and str(tmp_path) in message
    assert not (tmp_path / "m.wasm").exists()


def test_webgpu_build_links_model_wasm(device_build):
    """With the web runtime built (set-up), the webgpu artifact holds model.wasm, listed
    in the manifest like every file; a wasm module that exports TVM's entry points."""
    from qwen35_mobile.bindings import web_runtime

    need(web_runtime.why_unavailable(), "TVM's web runtime (emscripten build)")
    out = device_build("webgpu", "q0f32")
    manifest = json.loads((out / "manifest.json").read_text())
    wasm = out / "model.wasm"
    assert manifest["wasm"] == "model.wasm" and manifest["wasm_bytes"] == wasm.stat().st_size
    assert manifest["files"]["model.wasm"]["bytes"] == wasm.stat().st_size
    data = wasm.read_bytes()
    assert data[:4] == b"\0asm"
    # the runtime's system-library registry and the model's own functions are linked in
    for symbol in (b"TVMFFIEnvModRegisterSystemLibSymbol", b"prefill_all_logits"):
        assert symbol in data, symbol


# --------------------------------------------------------------------------
# Static checks of the device code (parity/static_checks.py)
# --------------------------------------------------------------------------


def test_webgpu_storage_buffers_per_kernel(device_build):
    from qwen35_mobile.parity.static_checks import (
        WEBGPU_MAX_STORAGE_BUFFERS,
        device_source,
        wgsl_storage_buffers,
    )

    counts = wgsl_storage_buffers(device_source(device_build("webgpu", "q0f16") / "model.tar"))
    assert len(counts) > 20 and "gated_delta_rule_kernel" in counts
    over = {name for name, n in counts.items() if n > WEBGPU_MAX_STORAGE_BUFFERS}
    assert not over, f"kernels over the WebGPU storage-buffer limit: {over}"


def test_opencl_kernels_build_on_pocl(device_build):
    """The whole model's OpenCL C (fp32: PoCL has no fp16) builds with a real OpenCL compiler."""
    from qwen35_mobile.parity.static_checks import check_opencl, device_source, kernel_sources

    source = device_source(device_build("android", "q0f32") / "model.tar")
    kernels = kernel_sources(source)  # one "// Function:" section per kernel (102 for tiny q0f32)
    assert "qwen35_tiny_q0f32_gated_delta_rule_chunk_scan_kernel" in kernels and len(kernels) > 50
    report = need_tool(lambda: check_opencl(source), "PoCL (pyopencl)")
    assert report.startswith(f"{len(kernels)} kernels built on "), (len(kernels), report)


@pytest.mark.parametrize("quant", ["q0f16", "q0f32"])
def test_metal_kernels_pass_clang_syntax_check(device_build, quant):
    """Every Metal kernel of the model parses and type-checks with clang against a stub metal_stdlib."""
    from qwen35_mobile.parity.static_checks import check_metal, device_source

    source = device_source(device_build("ios", quant) / "model.tar")
    units = source.count("#include <metal_stdlib>")
    assert units > 50 and units == source.count("kernel void ")  # one kernel per unit
    report = need_tool(lambda: check_metal(source), "clang (Metal syntax check)")
    assert report.startswith(f"{units} Metal kernels pass the clang syntax check"), report


def test_metal_check_catches_errors():
    from qwen35_mobile.errors import UserError
    from qwen35_mobile.parity.static_checks import check_metal, metal_clang

    need_tool(metal_clang, "clang (Metal syntax check)")
    good = "#include <metal_stdlib>\nusing namespace metal;\nkernel void ok(device float* a [[ buffer(0) ]]) { a[0] = exp(a[1]); }\n"
    bad = "#include <metal_stdlib>\nusing namespace metal;\nkernel void k(device float* a [[ buffer(0) ]]) { a[0] = exp(a[1]) }\n"
    with pytest.raises(
        UserError, match=r"1 of 2 Metal kernels fail the clang syntax check \(k\):\n.*expected ';'"
    ):
        check_metal(good + bad)


def test_a_metal_kernel_broken_on_purpose_is_named(device_build):
    """The syntax check's negative control (``--break-kernel`` of the metal
    emulator): the Metal kernel of one TIR function made invalid, and only it
    fails, by name; an unknown name is refused."""
    from qwen35_mobile.errors import UserError
    from qwen35_mobile.parity.static_checks import (
        break_metal_kernel,
        device_source,
        metal_syntax_errors,
    )

    source = device_source(device_build("ios", "q0f16") / "model.tar")
    prefix = "qwen35_tiny_q0f16_"
    broken, names = break_metal_kernel(source, "gated_delta_rule_chunk_scan", prefix)
    assert names == [f"{prefix}gated_delta_rule_chunk_scan_kernel"]
    errors = need_tool(lambda: metal_syntax_errors(broken), "clang (Metal syntax check)")
    assert sorted(errors) == names
    assert "qwen35_broken_on_purpose" in errors[names[0]]
    with pytest.raises(UserError, match="no Metal kernel 'no_such_kernel'"):
        break_metal_kernel(source, "no_such_kernel", prefix)


@pytest.mark.parametrize("target", STATIC_TARGETS)
def test_objects_need_only_the_tvm_runtime(device_build, target):
    """What an app links: no symbol left undefined but the TVM runtime's (tvm-ffi C API)."""
    from qwen35_mobile.parity.static_checks import check_symbols, undefined_symbols

    tar = device_build(target, "q0f16") / "model.tar"
    report = need_tool(lambda: check_symbols(tar), "llvm-nm")
    undefined = undefined_symbols(tar)
    assert report == f"{len(undefined)} undefined symbols, all the TVM runtime's"
    assert any("TVMFFIEnvModRegisterSystemLibSymbol" in s for s in undefined)


def test_short_system_lib_prefix_still_breaks_get_attr():
    """Why build() passes system_lib=False: TVM 0.27 cannot read back a module
    attribute string of up to 7 bytes (SmallStr), which its wasm auto-detection
    does.  When this test fails, the workaround can go."""
    import tvm

    mod = tvm.IRModule({}).with_attr("system_lib_prefix", "qwen35_")
    with pytest.raises(TypeError, match="SmallStr"):
        mod.get_attr("system_lib_prefix")


def test_system_lib_prefix_per_model_and_quantization():
    """Two models (or two quantizations of one) in one app need their own
    system-lib prefixes; the web build stays unprefixed (tvmjs)."""
    from qwen35_mobile.compile.compiler import system_lib_prefix_for
    from qwen35_mobile.errors import UserError

    android, web = get_target("android"), get_target("webgpu")
    assert system_lib_prefix_for(android, "qwen3.5-0.8b", "q4f16_1") == "qwen35_0_8b_q4f16_1_"
    assert system_lib_prefix_for(android, "qwen3.5-9b", "q0f16") == "qwen35_9b_q0f16_"
    assert (
        system_lib_prefix_for(get_target("ios"), "/models/Qwen3.5-2B", "q4f32_1")
        == "qwen35_2b_q4f32_1_"
    )
    assert system_lib_prefix_for(web, "qwen3.5-4b", "q4f16_1") == ""
    assert system_lib_prefix_for(android, "tiny", "q0f32", "myapp_chat_") == "myapp_chat_"
    with pytest.raises(UserError, match="must be a C identifier ending in '_'"):
        system_lib_prefix_for(android, "tiny", "q0f32", "my-app")
    with pytest.raises(UserError, match="has no system-lib prefix"):
        system_lib_prefix_for(get_target("host"), "tiny", "q0f32", "x_")
