"""The kernel backend is an argument: a KernelSet picked from the preset in one
place (compile/kernels/__init__.py: kernel_set_for), passed to the model, and
no kernel or model module reading an ambient target."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tvm
from tvm.relax.frontend import nn

from qwen35_mobile.compile import kernels as K
from qwen35_mobile.compile.config import preset
from qwen35_mobile.compile.model.qwen35 import Qwen35LM
from qwen35_mobile.targets import get_target

ROOT = Path(K.__file__).resolve().parents[1]  # compile/


@pytest.mark.parametrize(
    "name,backend,kind,sized_by",
    [
        ("host", K.CPU, "llvm", "host"),
        ("aarch64", K.CPU, "llvm", "aarch64"),
        ("android", K.GPU, "opencl", "android"),
        ("ios", K.GPU, "metal", "ios"),
        ("webgpu", K.GPU, "webgpu", "webgpu"),
        ("cuda", K.GPU, "cuda", "cuda"),
        ("android-pocl", K.GPU, "opencl", "android"),  # kernels_of: android's kernels
        # graph_of: android's kernels on the CPU
        ("android-twin", K.GPU_EMULATED, "opencl", "android"),
        ("webgpu-twin", K.GPU_EMULATED, "webgpu", "webgpu"),
    ],
)
def test_kernel_set_for(name, backend, kind, sized_by):
    kernels = K.kernel_set_for(get_target(name))
    assert kernels.backend == backend
    assert kernels.target.kind.name == kind
    want = get_target(sized_by).kernel_target()
    assert str(kernels.target) == str(want)


def test_no_ambient_target_in_model_or_kernels():
    """grep: the kernels are chosen and sized by arguments only."""
    pattern = re.compile(r"Target\.current|ContextVar|contextvars|current_target")
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for folder in ("model", "kernels")
        for path in sorted((ROOT / folder).glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, hits


def _deltanet_kernels(kernels: K.KernelSet, ambient: tvm.target.Target | None) -> dict[str, str]:
    """The TIR of both DeltaNet kernels exported with ``kernels`` (128-wide heads,
    so that the CPU column block and the GPU block sizes depend on the target),
    with ``ambient`` as the current target."""

    class _Block(nn.Module):
        def forward(self, x, conv_state, weight, q, k, v, g, beta, state):
            y, _ = kernels.causal_conv1d(x, conv_state, weight)
            return y, kernels.gated_delta_rule(q, k, v, g, beta, state)

    hk, hv, d, channels = 2, 2, 128, 768
    spec = {
        "x": nn.spec.Tensor(["b", "t", channels], "float32"),
        "conv_state": nn.spec.Tensor(["b", channels, 3], "float32"),
        "weight": nn.spec.Tensor([channels, 4], "float32"),
        "q": nn.spec.Tensor(["b", "t", hk, d], "float32"),
        "k": nn.spec.Tensor(["b", "t", hk, d], "float32"),
        "v": nn.spec.Tensor(["b", "t", hv, d], "float32"),
        "g": nn.spec.Tensor(["b", "t", hv], "float32"),
        "beta": nn.spec.Tensor(["b", "t", hv], "float32"),
        "state": nn.spec.Tensor(["b", hv, d, d], "float32"),
    }
    if ambient is None:
        mod, _ = _Block().export_tvm(spec={"forward": spec})
    else:
        with ambient:
            mod, _ = _Block().export_tvm(spec={"forward": spec})
    funcs = mod.functions_items()
    return {gv.name_hint: f.script() for gv, f in funcs if isinstance(f, tvm.tirx.PrimFunc)}


@pytest.mark.parametrize("name", ["host", "android", "android-twin"])
def test_ambient_target_is_ignored(name):
    """Exporting under another current target changes nothing: the set decides."""
    kernels = K.kernel_set_for(get_target(name))
    alone = _deltanet_kernels(kernels, None)
    for ambient in ({"kind": "cuda", "max_num_threads": 64}, {"kind": "llvm", "mcpu": "x86-64"}):
        assert alone == _deltanet_kernels(kernels, tvm.target.Target(ambient)), ambient
    scripts = "".join(alone.values())
    assert ("threadIdx" in scripts) == (kernels.backend == K.GPU), sorted(alone)
    if kernels.backend == K.CPU:
        assert set(alone) == {"gated_delta_rule", "causal_conv1d"}
        assert "T.parallel" in alone["gated_delta_rule"]
    else:
        assert {"causal_conv1d", "gated_delta_rule_chunk_scan"} <= set(alone), sorted(alone)


def test_model_takes_its_kernels():
    c = preset("tiny")
    host = get_target("host")
    with pytest.raises(TypeError):
        Qwen35LM(c, "float32", host.tvm_target())  # no default: the caller decides
    kernels = K.kernel_set_for(get_target("android-twin"))
    model = Qwen35LM(c, "float32", host.tvm_target(), kernels=kernels)
    blocks = [layer.linear_attn for layer in model.layers if not layer.is_full]
    assert blocks and all(b.kernels is kernels and b.conv1d.kernels is kernels for b in blocks)


# ------------------------------------------------- input checks, shared by the backends

_SETS = {
    "cpu": lambda: K.cpu_kernels(tvm.target.Target({"kind": "llvm"})),
    "gpu": lambda: K.gpu_kernels(get_target("android").tvm_target()),
    "gpu-emulated": lambda: K.gpu_emulated_kernels(get_target("android").tvm_target()),
}


def _export_gdn(kernels, shapes: dict[str, tuple[list, str]]):
    class _M(nn.Module):
        def forward(self, q, k, v, g, beta, state):
            return kernels.gated_delta_rule(q, k, v, g, beta, state)

    spec = {name: nn.spec.Tensor(shape, dtype) for name, (shape, dtype) in shapes.items()}
    return _M().export_tvm(spec={"forward": spec})


def _export_conv(kernels, shapes: dict[str, tuple[list, str]]):
    class _M(nn.Module):
        def forward(self, x, conv_state, weight):
            return kernels.causal_conv1d(x, conv_state, weight)

    spec = {name: nn.spec.Tensor(shape, dtype) for name, (shape, dtype) in shapes.items()}
    return _M().export_tvm(spec={"forward": spec})


GDN_OK = {
    "q": (["b", "t", 2, 16], "float32"),
    "k": (["b", "t", 2, 16], "float32"),
    "v": (["b", "t", 4, 16], "float32"),
    "g": (["b", "t", 4], "float32"),
    "beta": (["b", "t", 4], "float32"),
    "state": (["b", 4, 16, 16], "float32"),
}
GDN_BAD = [
    ({"k": (["b", "t", 2, 8], "float32")}, "differ from q's"),
    (
        {
            "v": (["b", "t", 3, 16], "float32"),
            "g": (["b", "t", 3], "float32"),
            "beta": (["b", "t", 3], "float32"),
            "state": (["b", 3, 16, 16], "float32"),
        },
        "not a multiple",
    ),
    ({"g": (["b", "t", 2], "float32")}, "g must have 4 heads"),
    ({"state": (["b", 4, 16, 8], "float32")}, "state must be"),
    ({"k": (["b", "t", 2, 16], "float16")}, "dtypes differ"),
    ({"beta": (["b", "t", 4], "float16")}, "beta must be float32"),
    ({"q": (["b", 2, 16], "float32")}, "q must be"),
]
CONV_OK = {
    "x": (["b", "t", 8], "float32"),
    "conv_state": (["b", 8, 3], "float32"),
    "weight": ([8, 1, 4], "float32"),
}
CONV_BAD = [
    ({"x": (["b", "t", 6], "float32")}, "channels"),
    ({"conv_state": (["b", 8, 2], "float32")}, "conv_state must be"),
    ({"conv_state": (["b", 8, 3], "float16")}, "differs from x dtype"),
    ({"weight": ([8, 2, 4], "float32")}, r"\[C, 1, K\]"),
    ({"weight": ([8, 1], "float32"), "conv_state": (["b", 8, 0], "float32")}, "at least 2"),
]


@pytest.mark.parametrize("backend", list(_SETS))
def test_input_checks(backend):
    kernels = _SETS[backend]()
    _export_gdn(kernels, GDN_OK)
    _export_conv(kernels, CONV_OK)
    for change, message in GDN_BAD:
        with pytest.raises(ValueError, match=message):
            _export_gdn(kernels, {**GDN_OK, **change})
    for change, message in CONV_BAD:
        with pytest.raises(ValueError, match=message):
            _export_conv(kernels, {**CONV_OK, **change})
