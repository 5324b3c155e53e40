"""The whole model on WebGPU as a web page runs it (parity/emulators/web_model.py):
the webgpu artifact's model.wasm (the build linked with TVM's web runtime, which the
set-up builds from the apache-tvm wheel) instantiated by tvmjs, its weights loaded by
tvmjs's tensor-cache loader, its VM, paged KV cache and RNN state on Dawn over
lavapipe, compared with transformers by the same report as the host build
(every prompt position, continued prefill, greedy and batched decode, the vision
tower and image prompts).

Needs the WebGPU emulator and the web runtime (scripts/setup_emulators.sh webgpu
web-runtime): skips naming what is missing, fails under CI=true.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import need

from qwen35_mobile.parity.emulators import web_model
from qwen35_mobile.parity.emulators.run import run_emulator
from qwen35_mobile.parity.report import CRITERIA, DEFAULT_PROMPTS, run_parity

CASES = {
    "prefill",
    "continued_prefill",
    "greedy",
    "batch_decode",
    "image_tower",
    "image_prompt",
    "image_greedy",
}


@pytest.fixture(scope="module")
def web_artifact(artifact):
    def make(quant: str):
        need(web_model.available(), "tvmjs on Dawn (scripts/setup_emulators.sh webgpu web-runtime)")
        return artifact("tiny", quant, target="webgpu")

    return make


# q0f32 at 1e-4 here; the other three quantizations pass too, measured with
# `qwen35-mobile parity ART --emulator webgpu --whole-model-only` (docs/web.md: the table).
# In the suite, fp16 on WebGPU is the per-kernel replay of the q0f16 build
# (tests/test_emulators.py): the whole q4f16_1 model took 5 minutes of the CI's 45.
@pytest.mark.parametrize("quant", ["q0f32"])
def test_whole_model_through_tvmjs_on_dawn(web_artifact, checkpoint, tmp_path, quant):
    art = web_artifact(quant)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["wasm"] == "model.wasm"
    report = run_emulator(
        "webgpu",
        art,
        checkpoint("tiny"),
        new_tokens=8,
        kernels=False,
        report=tmp_path / "parity-webgpu.json",
        progress=lambda _: None,
    )
    model = report["model"]
    assert report["pass"] and model["pass"], model["summary"]
    assert "kernels" not in report
    assert 0 < model["summary"]["max_rel"] <= CRITERIA[manifest["dtype"]]["max_rel"]
    assert CASES <= {c["case"] for c in model["cases"]}
    if manifest["dtype"] == "float32":
        assert all(c["greedy_agree"] for c in model["cases"] if "greedy_agree" in c)
    assert model["speed"]["prefill"] > 0 and model["speed"]["decode"] > 0


def test_whole_model_check_can_fail(web_artifact, checkpoint, tmp_path):
    """Negative control: the same artifact with its final norm weight scaled in the
    shard (sizes intact, so it loads) fails the comparison."""
    art = tmp_path / "corrupt"
    shutil.copytree(web_artifact("q0f32"), art)
    cache = json.loads((art / "tensor-cache.json").read_text())
    (shard, rec) = next(
        (s, r) for s in cache["records"] for r in s["records"] if r["name"] == "norm.weight"
    )
    path = art / shard["dataPath"]
    data = bytearray(path.read_bytes())
    start, end = rec["byteOffset"], rec["byteOffset"] + rec["nbytes"]
    data[start:end] = (np.frombuffer(data[start:end], "<f4") * 3 + 1).astype("<f4").tobytes()
    path.write_bytes(bytes(data))
    report = run_parity(
        art,
        checkpoint("tiny"),
        new_tokens=2,
        prompts=DEFAULT_PROMPTS[:1],
        ours=web_model.ours(art),
        progress=lambda _: None,
    )
    assert not report["pass"]
    text = [c for c in report["cases"] if c["case"] == "prefill"]
    assert text and all(c["max_rel"] > 1e-2 for c in text), text
