"""`qwen35-mobile parity --emulator` on the tiny model: every emulator passes,
its report holds real numbers and a plot, and, for every emulator, a kernel
broken on purpose is named by the report.  And the availability checks tell
"not installed" (a reason) from "installed and broken" (BrokenTool).

Each test skips, naming what is missing, when its emulator is not installed
(scripts/setup_emulators.sh installs them all; the test command runs it), and
fails instead under CI=true (tests/conftest.py: need).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import need
from PIL import Image

from qwen35_mobile.errors import UserError
from qwen35_mobile.parity.emulators import BrokenTool
from qwen35_mobile.parity.emulators.run import available, run_emulator


def _need(name: str) -> None:
    need(available(name), f"the {name} emulator")


def _run(name, artifact, checkpoint, tmp_path, quant="q0f32", new_tokens=8, **kw):
    _need(name)
    report_path = tmp_path / f"parity-{name}.json"
    report = run_emulator(
        name,
        artifact("tiny", quant),
        checkpoint("tiny"),
        new_tokens=new_tokens,
        report=report_path,
        progress=lambda _: None,
        **kw,
    )
    assert json.loads(report_path.read_text())["pass"] == report["pass"]
    return report, report_path


def _check_plot(report):
    image = Image.open(report["plot"])
    assert image.format == "PNG" and image.size[0] >= 800
    # not a blank page: the points and the tolerance line are drawn in colour
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert (np.abs(pixels.astype(int) - 255).sum(1) > 60).mean() > 0.01


def _check_kernels(report, tolerance):
    k = report["kernels"]["summary"]
    assert k["pass"], k["first_failure"]
    assert k["replayed"] >= 300 and k["kernels"] >= 50, (
        k
    )  # every call of a 120-token run, 2 decode steps
    assert 0 < k["max_rel"] <= tolerance
    steps = {r["step"] for r in report["kernels"]["calls"] if r["status"] == "pass"}
    assert steps == {
        "prefill",
        "prefill (continued)",
        "decode 1",
        "decode 2",
        "image",
        "image prompt",
        "decode after image",
    }
    # M-RoPE: the shift kernels ran with non-zero offsets (image tokens, then decode after them)
    for step in ("image prompt", "decode after image"):
        assert any(
            "mrope_shift" in r["kernel"] and r["status"] == "pass"
            for r in report["kernels"]["calls"]
            if r["step"] == step
        ), step
    # the hand-written GPU kernels, the KV cache's and the vision tower's are among those replayed
    names = {r.get("device_kernel") for r in report["kernels"]["calls"] if r["status"] == "pass"}
    for kernel in (
        "gated_delta_rule_chunk_scan",
        "causal_conv1d",
        "tir_attention_merge_state",
        "vision_attention",
        "patchify",
        "interpolate_positions",
        "vision_rope",
    ):
        assert kernel in names, names
    image = [r for r in report["kernels"]["calls"] if r["step"] == "image"]
    bad = [r for r in image if r["status"] != "pass" and not r["kernel"].startswith("shape_func")]
    assert not bad, bad


def _check_tower(report, tolerance):
    """The vision tower on the emulator against transformers, both parity images."""
    towers = [c for c in report["model"]["cases"] if c["case"] == "image_tower"]
    assert len(towers) == 2 and all(c["max_rel"] <= tolerance for c in towers), towers
    # ... and image prompts end to end (every position, then greedy)
    prompts = [c for c in report["model"]["cases"] if c["case"] in ("image_prompt", "image_greedy")]
    assert len(prompts) == 6 and all(c["max_rel"] <= tolerance for c in prompts), prompts
    assert all(c["greedy_agree"] for c in prompts if c["case"] == "image_greedy"), prompts


def test_opencl_whole_model_and_every_kernel_on_pocl(artifact, checkpoint, tmp_path):
    report, _ = _run("opencl", artifact, checkpoint, tmp_path)
    model = report["model"]["summary"]
    assert report["pass"]
    assert model["max_rel"] <= 1e-4 and model["greedy_agreement"] and model["top1_agreement"] == 1.0
    _check_tower(report, 1e-4)
    _check_kernels(report, 1e-4)
    _check_plot(report)


@pytest.mark.parametrize("quant,tolerance", [("q0f16", 1e-2)])
def test_webgpu_every_wgsl_kernel_on_dawn(artifact, checkpoint, tmp_path, quant, tolerance):
    # The whole model on WebGPU: tests/test_web_model.py (q0f32 at 1e-4 and q4f16_1), which
    # runs every q0f32 kernel in place; the replay here checks each fp16 kernel on its own.
    report, _ = _run("webgpu", artifact, checkpoint, tmp_path, quant=quant, whole_model=False)
    assert report["pass"] and "model" not in report
    _check_kernels(report, tolerance)
    _check_plot(report)


def test_webgpu_other_gqa_ratio(artifact, checkpoint, tmp_path):
    """tiny-gva: twice as many value heads as key heads in the DeltaNet layers."""
    _need("webgpu")
    report = run_emulator(
        "webgpu",
        artifact("tiny-gva", "q0f16"),
        checkpoint("tiny-gva"),
        report=tmp_path / "gva.json",
        progress=lambda _: None,
        whole_model=False,
    )
    assert report["pass"]
    _check_kernels(report, 1e-2)


def test_aarch64_whole_model_and_every_kernel_under_qemu(artifact, checkpoint, tmp_path):
    report, _ = _run("aarch64", artifact, checkpoint, tmp_path)
    assert report["pass"]
    assert (
        report["model"]["summary"]["max_rel"] <= 1e-4
        and report["model"]["summary"]["greedy_agreement"]
    )
    _check_tower(report, 1e-4)
    k = report["kernels"]["summary"]
    assert k["pass"] and k["replayed"] >= 300 and k["max_rel"] <= 1e-4
    # The CPU tower is a graph, not the GPU kernel: its patchify, scores, softmax and
    # values kernels are replayed like the decoder's.
    replayed = {r["kernel"] for r in report["kernels"]["calls"]}
    assert {"patchify", "attention_values", "softmax", "layer_norm"} <= replayed
    assert any(k.startswith("fused_attention_scores") for k in replayed)
    _check_plot(report)


def test_metal_is_a_syntax_check_not_parity(artifact, checkpoint, tmp_path):
    report, _ = _run("metal", artifact, checkpoint, tmp_path, quant="q0f16")
    syntax = report["syntax"]
    assert report["pass"] and syntax["pass"] and syntax["failing_kernels"] == []
    assert syntax["kernels"] > 50  # every kernel of the ios build (111 for tiny q0f16)
    assert syntax["message"].startswith(
        f"{syntax['kernels']} Metal kernels pass the clang syntax check"
    )
    assert syntax["kind"] == "syntax check (clang, stub metal_stdlib), not parity"
    assert "model" not in report and "kernels" not in report and report["plot"] is None


#: emulator -> (the kernel broken on purpose, the step of its first failure).
#: The GPU emulators replay the device build's attention-state merge; the
#: aarch64 replay runs the aarch64 build's (CPU) merge, from a library of that
#: one kernel built broken and cross-linked like the model's.
BROKEN = {
    "webgpu": ("tir_attention_merge_state", "prefill (continued)"),
    "opencl": ("tir_attention_merge_state", "prefill (continued)"),
    "aarch64": ("merge_state_inplace_cpu", "prefill (continued)"),
}


@pytest.mark.parametrize("emulator", list(BROKEN))
def test_a_broken_kernel_is_named_by_the_report(artifact, checkpoint, tmp_path, emulator):
    """Corrupt one device kernel (its outputs * 1.5 + 0.25): the report fails and
    names exactly that kernel, first failure included, and no other."""
    broken, step = BROKEN[emulator]
    # Kernels only: the whole-model run (PoCL, qemu) is the passing test's; skipping it
    # here saves its compile and run (minutes under qemu) and proves nothing less.
    report, _ = _run(
        emulator,
        artifact,
        checkpoint,
        tmp_path,
        break_kernel=broken,
        whole_model=False,
        new_tokens=2,  # the broken kernel first fails in the continued prefill
    )
    assert "model" not in report
    k = report["kernels"]["summary"]
    assert not report["pass"] and not k["pass"]
    assert k["failing_kernels"] == [broken]
    assert k["first_failure"]["device_kernel"] == broken and k["first_failure"]["step"] == step
    assert k["first_failure"]["max_rel"] > 0.1
    failing = {r["index"] for r in report["kernels"]["calls"] if r["status"] in ("fail", "error")}
    calls_of_broken = {
        r["index"] for r in report["kernels"]["calls"] if r.get("device_kernel") == broken
    }
    assert failing and failing <= calls_of_broken  # every other kernel still passes
    _check_plot(report)


def test_a_broken_metal_kernel_is_named_by_the_syntax_check(artifact, checkpoint, tmp_path):
    """The metal emulator's negative control: one Metal kernel's source made
    invalid on purpose fails the syntax check, which names it and no other."""
    report, _ = _run(
        "metal",
        artifact,
        checkpoint,
        tmp_path,
        quant="q0f16",
        break_kernel="tir_attention_merge_state",
    )
    syntax = report["syntax"]
    assert not report["pass"] and not syntax["pass"]
    assert syntax["broken_on_purpose"] == ["qwen35_tir_attention_merge_state_kernel"]
    assert syntax["failing_kernels"] == syntax["broken_on_purpose"]
    assert "qwen35_broken_on_purpose" in syntax["message"]


def test_bad_requests_are_refused(artifact, checkpoint, tmp_path):
    with pytest.raises(UserError, match="unknown emulator 'vulkan'"):
        run_emulator("vulkan", artifact("tiny"), checkpoint("tiny"))
    with pytest.raises(UserError, match="cannot run float16 builds: PoCL has no cl_khr_fp16"):
        run_emulator("opencl", artifact("tiny", "q0f16"), checkpoint("tiny"))
    with pytest.raises(UserError, match="no config.json"):
        run_emulator("webgpu", artifact("tiny"), tmp_path)


# ---------------------------------------------------------------------------
# Not installed (a reason: skip, or fail under CI=true) vs installed and broken
# (BrokenTool: always a failure).  No model is built; each test fakes one
# emulator's state, and needs only what reaching that state takes.
# ---------------------------------------------------------------------------
@pytest.fixture
def fresh_webgpu(monkeypatch):
    """webgpu.py with its cached verdict and runner set aside (restored after)."""
    from qwen35_mobile.parity.emulators import webgpu

    for name, value in (
        ("_CHECKED", False),
        ("_UNAVAILABLE", None),
        ("_BROKEN", None),
        ("_RUNNER", None),
    ):
        monkeypatch.setattr(webgpu, name, value)
    return webgpu


def test_webgpu_without_node_is_not_installed(fresh_webgpu, monkeypatch):
    monkeypatch.setenv(fresh_webgpu.NODE_ENV, "/nonexistent/node")
    reason = fresh_webgpu.available()
    assert reason.startswith("node (Node.js >= 18) is not installed (/nonexistent/node not found)")
    assert available("webgpu") == f"{reason} (scripts/setup_emulators.sh installs every emulator)"


@pytest.mark.parametrize(
    "script",
    [
        "throw new Error('the launcher broke on purpose');\n",  # a traceback, exit 1
        "process.stdout.write('not json\\n');\n",  # garbage on the protocol
        "process.exit(0);\n",  # exits without a word
    ],
)
def test_webgpu_with_a_crashing_launcher_is_broken(fresh_webgpu, monkeypatch, tmp_path, script):
    """Node, the npm package and an ICD are there, our launcher crashes: the
    check raises (every time), it never returns a reason to skip."""
    need(fresh_webgpu._node() is None and "node is not on PATH", "Node.js")
    module, icd = tmp_path / "index.js", tmp_path / "icd.json"
    module.write_text("export const create = () => null; export const globals = {};\n")
    icd.write_text("{}")
    runner = tmp_path / "run_wgsl.mjs"
    runner.write_text(script)
    monkeypatch.setattr(fresh_webgpu, "RUNNER", runner)
    monkeypatch.setattr(fresh_webgpu, "WEBGPU_MODULE", module)
    monkeypatch.setenv("QWEN35_VK_ICD", str(icd))
    with pytest.raises(BrokenTool, match="installed but does not work: run_wgsl.mjs") as first:
        fresh_webgpu.available()
    if "throw" in script:
        assert "the launcher broke on purpose" in str(first.value)
    with pytest.raises(BrokenTool):  # the verdict is kept: the next check raises as well
        available("webgpu")


def _fresh_opencl(monkeypatch):
    from qwen35_mobile.bindings import opencl_runtime

    monkeypatch.setattr(opencl_runtime, "_loaded", None)
    monkeypatch.setattr(opencl_runtime, "_registered", lambda: False)
    return opencl_runtime


def test_opencl_without_the_add_on_is_not_installed(monkeypatch, tmp_path):
    ocl = _fresh_opencl(monkeypatch)
    monkeypatch.setenv(ocl.ENV, str(tmp_path / "libtvm_runtime_opencl.so"))
    assert "the OpenCL runtime add-on is not built" in ocl.why_unavailable()


def test_opencl_add_on_that_is_not_a_library_is_broken(monkeypatch, tmp_path):
    ocl = _fresh_opencl(monkeypatch)
    fake = tmp_path / "libtvm_runtime_opencl.so"
    fake.write_bytes(b"not an ELF file at all")
    monkeypatch.setenv(ocl.ENV, str(fake))
    with pytest.raises(BrokenTool, match="exists but does not load"):
        ocl.why_unavailable()


def test_opencl_add_on_that_registers_nothing_is_broken(monkeypatch, tmp_path):
    """A loadable shared library that registers no OpenCL device API."""
    ocl = _fresh_opencl(monkeypatch)
    src = tmp_path / "empty.c"
    src.write_text("int qwen35_nothing_here(void) { return 0; }\n")
    cc = shutil.which("cc") or shutil.which("gcc")
    need(cc is None and "no C compiler (cc)", "a C compiler")
    lib = tmp_path / "libtvm_runtime_opencl.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    monkeypatch.setenv(ocl.ENV, str(lib))
    with pytest.raises(BrokenTool, match="loaded but registered no OpenCL device API"):
        ocl.why_unavailable()


def test_opencl_without_a_driver_is_not_installed_with_one_and_no_device_broken(
    monkeypatch, tmp_path
):
    ocl = _fresh_opencl(monkeypatch)
    monkeypatch.setattr(ocl, "load_opencl_runtime", lambda: None)  # the add-on is there
    monkeypatch.setenv("OCL_ICD_VENDORS", str(tmp_path / "no-vendors"))
    assert ocl.why_unavailable().startswith("no OpenCL driver is installed")
    vendors = tmp_path / "vendors"
    vendors.mkdir()
    (vendors / "pocl.icd").write_text("libpocl.so.2\n")
    monkeypatch.setenv("OCL_ICD_VENDORS", str(vendors))
    monkeypatch.setattr(ocl, "opencl_device_count", lambda: 0)
    with pytest.raises(BrokenTool, match="sees no OpenCL device"):
        ocl.why_unavailable()


def test_pyopencl_with_a_bogus_driver_is_broken(tmp_path):
    """pyopencl installed, an ICD that names a library that does not exist: the
    static check raises BrokenTool.  (A fresh process: the ICD loader reads
    the vendors once per process.)"""
    try:
        import pyopencl  # noqa: F401
    except ModuleNotFoundError:
        need("pyopencl is not installed", "pyopencl")
    (tmp_path / "bogus.icd").write_text(str(tmp_path / "libnot-a-driver.so") + "\n")
    probe = (
        "from qwen35_mobile.parity.static_checks import opencl_devices\n"
        "try:\n    opencl_devices()\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    env = {"OCL_ICD_VENDORS": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.stdout.startswith("BrokenTool OpenCL drivers are installed"), out.stdout + out.stderr
    env["OCL_ICD_VENDORS"] = str(tmp_path / "none")
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.stdout.startswith("CheckUnavailable no OpenCL driver is installed"), (
        out.stdout + out.stderr
    )


def test_aarch64_without_qemu_is_not_installed_and_a_broken_sysroot_is_broken(
    monkeypatch, tmp_path
):
    from qwen35_mobile.parity.emulators import aarch64

    monkeypatch.setattr(aarch64, "_PROBED", {})
    real_qemu = aarch64.QEMU
    monkeypatch.setattr(aarch64, "QEMU", "qemu-aarch64-nonexistent")
    assert aarch64.available().startswith("qemu-aarch64-nonexistent not found")
    monkeypatch.setattr(aarch64, "QEMU", real_qemu)
    need(
        shutil.which(real_qemu) is None and f"no {real_qemu} (Debian: qemu-user-static)",
        "qemu-user",
    )
    sysroot = (
        tmp_path / "sysroot"
    )  # every file the check looks for, but a python3.11 that is not a program
    (sysroot / "usr/bin").mkdir(parents=True)
    (sysroot / "usr/bin/python3.11").write_bytes(b"\x7fELF broken")
    for package in ("tvm", "tvm_ffi", "numpy", "qwen35_mobile"):
        (sysroot / "usr/lib/python3/dist-packages" / package).mkdir(parents=True)
    monkeypatch.setenv("QWEN35_AARCH64_SYSROOT", str(sysroot))
    with pytest.raises(BrokenTool, match="the aarch64 emulator is installed but does not work"):
        aarch64.available()
    with pytest.raises(BrokenTool):  # cached, and through the driver as well
        available("aarch64")


def test_metal_without_clang_is_not_installed_and_a_failing_clang_is_broken(monkeypatch, tmp_path):
    from qwen35_mobile.parity import static_checks

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert available("metal").startswith("no clang on PATH")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "clang").write_text("#!/bin/sh\necho 'clang: error: broken on purpose' >&2\nexit 1\n")
    (fake / "clang").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    static_checks._metal_probe.cache_clear()
    try:
        with pytest.raises(
            BrokenTool, match="fails a known-good Metal kernel(.|\n)*broken on purpose"
        ):
            available("metal")
    finally:
        static_checks._metal_probe.cache_clear()


def test_need_fails_under_ci_and_skips_outside(monkeypatch):
    import conftest

    monkeypatch.setattr(conftest, "CI", True)
    with pytest.raises(
        pytest.fail.Exception, match="Dawn is not installed, and CI=true requires it: no node"
    ):
        conftest.need("no node", "Dawn")
    monkeypatch.setattr(conftest, "CI", False)
    with pytest.raises(pytest.skip.Exception, match="Dawn is not installed: no node"):
        conftest.need("no node", "Dawn")
    conftest.need(None, "Dawn")  # installed: nothing happens
    with pytest.raises(pytest.skip.Exception, match="no module named 'no_such_package_qwen35'"):
        conftest.need_module("no_such_package_qwen35.sub")
    monkeypatch.setattr(conftest, "CI", True)
    with pytest.raises(pytest.fail.Exception, match="no module named 'no_such_package_qwen35'"):
        conftest.need_module("no_such_package_qwen35")
