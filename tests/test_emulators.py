"""`qwen35-mobile parity --emulator` on the tiny model: every emulator passes,
its report holds real numbers and a plot, and a kernel broken on purpose is
named by the report.

Each test skips, naming what is missing, when its emulator is not installed
(scripts/setup_emulators.sh installs them all; the test command runs it).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from qwen35_mobile.bindings.emulators.run import available, run_emulator
from qwen35_mobile.errors import UserError


def _need(name: str) -> None:
    reason = available(name)
    if reason:
        pytest.skip(f"{name} emulator not installed: {reason}")


def _run(name, artifact, checkpoint, tmp_path, quant="q0f32", **kw):
    _need(name)
    report_path = tmp_path / f"parity-{name}.json"
    report = run_emulator(name, artifact("tiny", quant), checkpoint("tiny"), new_tokens=8,
                          report=report_path, progress=lambda _: None, **kw)
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
    assert k["replayed"] >= 300 and k["kernels"] >= 50, k  # every call of a 120-token run, 2 decode steps
    assert 0 < k["max_rel"] <= tolerance
    steps = {r["step"] for r in report["kernels"]["calls"] if r["status"] == "pass"}
    assert steps == {"prefill", "prefill (continued)", "decode 1", "decode 2"}
    # the hand-written GPU kernels and the KV cache's kernels are among those replayed
    names = {r.get("device_kernel") for r in report["kernels"]["calls"] if r["status"] == "pass"}
    for kernel in ("gated_delta_rule_chunk_scan", "causal_conv1d", "tir_attention_merge_state"):
        assert kernel in names, names


def test_opencl_whole_model_and_every_kernel_on_pocl(artifact, checkpoint, tmp_path):
    report, _ = _run("opencl", artifact, checkpoint, tmp_path)
    model = report["model"]["summary"]
    assert report["pass"]
    assert model["max_rel"] <= 1e-4 and model["greedy_agreement"] and model["top1_agreement"] == 1.0
    _check_kernels(report, 1e-4)
    _check_plot(report)


@pytest.mark.parametrize("quant,tolerance", [("q0f32", 1e-4), ("q0f16", 1e-2)])
def test_webgpu_every_wgsl_kernel_on_dawn(artifact, checkpoint, tmp_path, quant, tolerance):
    report, _ = _run("webgpu", artifact, checkpoint, tmp_path, quant=quant)
    assert report["pass"] and "model" not in report
    _check_kernels(report, tolerance)
    _check_plot(report)


def test_webgpu_other_gqa_ratio(artifact, checkpoint, tmp_path):
    """tiny-gva: twice as many value heads as key heads in the DeltaNet layers."""
    _need("webgpu")
    report = run_emulator("webgpu", artifact("tiny-gva", "q0f16"), checkpoint("tiny-gva"),
                          report=tmp_path / "gva.json", progress=lambda _: None)
    assert report["pass"]
    _check_kernels(report, 1e-2)


def test_aarch64_whole_model_and_every_kernel_under_qemu(artifact, checkpoint, tmp_path):
    report, _ = _run("aarch64", artifact, checkpoint, tmp_path)
    assert report["pass"]
    assert report["model"]["summary"]["max_rel"] <= 1e-4 and report["model"]["summary"]["greedy_agreement"]
    k = report["kernels"]["summary"]
    assert k["pass"] and k["replayed"] >= 300 and k["max_rel"] <= 1e-4
    _check_plot(report)


def test_metal_is_a_syntax_check_not_parity(artifact, checkpoint, tmp_path):
    report, _ = _run("metal", artifact, checkpoint, tmp_path, quant="q0f16")
    assert report["pass"] and report["syntax"]["kernels"] > 20
    assert "not parity" in report["syntax"]["kind"]
    assert "model" not in report and "kernels" not in report and report["plot"] is None


@pytest.mark.parametrize("emulator", ["webgpu"])
def test_a_broken_kernel_is_named_by_the_report(artifact, checkpoint, tmp_path, emulator):
    """Corrupt one device kernel (its outputs * 1.5 + 0.25): the report fails and
    names exactly that kernel, first failure included, and no other."""
    broken = "tir_attention_merge_state"
    report, _ = _run(emulator, artifact, checkpoint, tmp_path, break_kernel=broken)
    k = report["kernels"]["summary"]
    assert not report["pass"] and not k["pass"]
    assert k["failing_kernels"] == [broken]
    assert k["first_failure"]["device_kernel"] == broken and k["first_failure"]["step"] == "prefill (continued)"
    assert k["first_failure"]["max_rel"] > 0.1
    _check_plot(report)


def test_bad_requests_are_refused(artifact, checkpoint, tmp_path):
    with pytest.raises(UserError, match="unknown emulator 'vulkan'"):
        run_emulator("vulkan", artifact("tiny"), checkpoint("tiny"))
    with pytest.raises(UserError, match="cannot run float16 builds: PoCL has no cl_khr_fp16"):
        run_emulator("opencl", artifact("tiny", "q0f16"), checkpoint("tiny"))
    with pytest.raises(UserError, match="--break-kernel works with the emulators that replay GPU kernels"):
        run_emulator("aarch64", artifact("tiny"), checkpoint("tiny"), break_kernel="rms_norm")
    with pytest.raises(UserError, match="no config.json"):
        run_emulator("webgpu", artifact("tiny"), tmp_path)
