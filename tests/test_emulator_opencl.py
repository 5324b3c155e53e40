"""OpenCL builds executed on PoCL through the project's TVM runtime add-on
(bindings/opencl_runtime, built by scripts/setup_emulators.d/opencl.sh).

When the add-on or PoCL is not installed the tests skip, or fail under CI=true
(tests/conftest.py: need); installed and broken, they fail."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import need


def _opencl_or_skip():
    from qwen35_mobile.bindings.opencl_runtime import why_unavailable

    need(why_unavailable(), "the OpenCL emulator (PoCL + the project's runtime add-on)")


@pytest.fixture(scope="module", autouse=True)
def _pocl(tmp_path_factory):
    import os

    # PoCL's kernel cache: kept between runs, next to the add-on (ignored by git).
    from qwen35_mobile.bindings.opencl_runtime import DEFAULT_PATH

    cache = DEFAULT_PATH.parents[1] / "pocl-cache"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = tmp_path_factory.mktemp("pocl-cache")
    os.environ.setdefault("POCL_CACHE_DIR", str(cache))
    _opencl_or_skip()


def _small_module():
    import tvm
    from tvm.script import relax as R

    @tvm.script.ir_module
    class Module:
        @R.function
        def main(
            x: R.Tensor((4, 8), "float32"),
            w: R.Tensor((8, 16), "float32"),
            b: R.Tensor((16,), "float32"),
        ):
            with R.dataflow():
                y = R.nn.relu(R.add(R.matmul(x, w), b))
                s = R.nn.softmax(y, axis=-1)
                R.output(y, s)
            return (y, s)

    return Module


def _build(mod):
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    target = tvm.target.Target({"kind": "opencl"}, host="llvm")
    with target:
        mod = relax.transform.LegalizeOps()(mod)
        mod = dl.ApplyDefaultSchedule(
            dl.gpu.Matmul(),
            dl.gpu.GEMV(),
            dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(),
            dl.gpu.Fallback(),
        )(mod)
    return tvm.compile(mod, target=target)


def _reference(x, w, b):
    y = np.maximum(x @ w + b, 0)
    e = np.exp(y - y.max(-1, keepdims=True))
    return y, e / e.sum(-1, keepdims=True)


def test_relax_module_runs_on_pocl(tmp_path):
    """matmul + add + relu and a softmax, built for OpenCL, run in the Relax VM on
    PoCL: straight from tvm.compile and after export_library / load_module."""
    import tvm
    from tvm import relax

    ex = _build(_small_module())
    dev = tvm.opencl(0)
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype("float32") for s in [(4, 8), (8, 16), (16,)])
    want_y, want_s = _reference(x, w, b)

    vm = relax.VirtualMachine(ex, dev)
    y, s = vm["main"](*(tvm.runtime.tensor(a, dev) for a in (x, w, b)))
    np.testing.assert_allclose(y.numpy(), want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s.numpy(), want_s, rtol=1e-5, atol=1e-6)

    ex.export_library(str(tmp_path / "lib.so"))
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "lib.so")), dev)
    _, s = vm["main"](*(tvm.runtime.tensor(a, dev) for a in (x, w, b)))
    np.testing.assert_allclose(s.numpy(), want_s, rtol=1e-5, atol=1e-6)


def test_device_api_copies_with_offsets():
    """Host <-> device and device <-> device copies, also into and out of views
    with a byte offset."""
    import tvm

    from qwen35_mobile.parity.static_checks import opencl_devices

    dev = tvm.opencl(0)
    _, devices = opencl_devices()  # what the OpenCL driver itself reports, through pyopencl
    assert dev.exist and dev.max_threads_per_block == devices[0].max_work_group_size
    a = np.arange(64, dtype="float32")
    t = tvm.runtime.tensor(a, dev)
    np.testing.assert_array_equal(t.numpy(), a)
    u = tvm.runtime.empty((64,), "float32", dev)
    t.copyto(u)
    np.testing.assert_array_equal(u.numpy(), a)
    view = u._create_view((16,), "float32", relative_byte_offset=32 * 4)
    np.testing.assert_array_equal(view.numpy(), a[32:48])
    view.copyfrom(np.full(16, -1, dtype="float32"))
    want = a.copy()
    want[32:48] = -1
    np.testing.assert_array_equal(u.numpy(), want)


# ---------------------------------------------------------------------------
# The whole tiny model, built for `android-pocl` (android's OpenCL kernels,
# host code for this machine)
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pocl_artifact(checkpoint, tmp_path_factory):
    from qwen35_mobile.compile.compiler import compile_model

    out = tmp_path_factory.mktemp("pocl") / "tiny-q0f32-android-pocl"
    compile_model(str(checkpoint("tiny")), "android-pocl", "q0f32", out, progress=lambda _: None)
    return out


def test_tiny_model_token_by_token_matches_host(pocl_artifact, artifact):
    """One token at a time (prefill of one token, then decodes), the OpenCL
    build on PoCL gives the host build's logits (fp32)."""
    from qwen35_mobile.bindings.engine import Engine

    ids = [5, 17, 99, 3, 42, 7, 8, 100]
    ours, host = Engine(pocl_artifact), Engine(artifact("tiny", "q0f32"))
    assert ours.device.dlpack_device_type() == 4  # kDLOpenCL
    a, b = ours.add_sequence(), host.add_sequence()
    got, want = [ours.prefill(a, ids[:1])], [host.prefill(b, ids[:1])]
    for tok in ids[1:]:
        got.append(ours.decode([a], [tok])[0])
        want.append(host.decode([b], [tok])[0])
    got, want = np.stack(got), np.stack(want)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= 1e-4, rel
    assert (got.argmax(-1) == want.argmax(-1)).all()


# The whole model against transformers on PoCL (and every kernel replayed):
# tests/test_emulators.py, through `qwen35-mobile parity --emulator opencl`.


def test_contract_refuses_opencl_without_the_add_on(pocl_artifact, monkeypatch):
    """Without the add-on (and not loaded yet) the bindings say what to run."""
    from qwen35_mobile.bindings import opencl_runtime
    from qwen35_mobile.bindings.contract import check_contract
    from qwen35_mobile.errors import UserError

    monkeypatch.setattr(opencl_runtime, "_loaded", None)
    monkeypatch.setattr(opencl_runtime, "_registered", lambda: False)
    monkeypatch.setenv(opencl_runtime.ENV, "/nonexistent/libtvm_runtime_opencl.so")
    with pytest.raises(UserError, match="setup_emulators.sh"):
        check_contract(pocl_artifact)
