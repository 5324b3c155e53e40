"""Quantized device builds: the dequantization is fused into the device kernels."""

import pytest

from qwen35_mobile.compile.compiler import compile_model
from qwen35_mobile.parity.static_checks import device_source, kernel_sources


@pytest.mark.parametrize("target", ["android", "ios", "webgpu"])
def test_q4f16_1_device_build_fuses_dequantization(target, tmp_path):
    out = tmp_path / target
    manifest = compile_model("tiny", target, "q4f16_1", out, progress=lambda _: None, wasm=False)
    assert manifest["quantization"] == "q4f16_1"
    assert any(p["dtype"] == "uint32" for p in manifest["parameters"])
    names = list(kernel_sources(device_source(out / manifest["library"])))
    # Every dequantization sits inside a matmul kernel (or the embedding
    # gather): no kernel materialises a dequantized weight on its own.
    deq = [n for n in names if "dequantize" in n]
    assert sum("dequantize_NT_matmul" in n for n in deq) >= 10
    assert all("NT_matmul" in n or "dequantize_take" in n for n in deq), deq
