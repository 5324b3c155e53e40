"""WebLLM (npm @mlc-ai/web-llm, pinned) loads our webgpu build (compile/model/webllm.py).

1. The functions WebLLM calls besides the decoder, run through tvmjs on Dawn
   (parity/emulators/web_model.py's ``WebEngine.call``) and compared with numpy:
   ``_metadata``, the descending argsort (ties by index, as a stable sort),
   top-p sampling, softmax with temperature, and the three in-place logit
   processors.
2. WebLLM itself in headless Chromium (WebGPU on SwiftShader) through a custom app
   config (``model`` = the artifact, ``model_lib`` = its model.wasm): its greedy
   tokens for the chat prompt of tests/test_web_page.py are the host build's; with
   a logit bias it emits the biased token (the same comparison then fails: the
   check can tell tokens apart); a chat completion runs through the artifact's
   conv_template.

Needs the WebGPU emulator, the web runtime and the browser part
(scripts/setup_emulators.sh webgpu web-runtime browser): skips naming what is
missing, fails under CI=true.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import chromium_missing, host_greedy, need

from qwen35_mobile.bindings import web_page
from qwen35_mobile.parity.emulators import web_model

DRIVER = Path(web_page.__file__).resolve().parents[2] / "parity" / "emulators" / "browser"
WEBLLM = web_page.BROWSER_MODULES / "@mlc-ai" / "web-llm" / "lib" / "index.js"
PLAYWRIGHT = web_page.BROWSER_MODULES / "playwright-core" / "index.js"
PROMPT = "What is the capital of France?"  # tests/test_web_page.py's
NEW_TOKENS = 8  # SwiftShader decodes ~0.1 token/s through WebLLM (docs/web.md)
BIAS_TOKEN = 1234


@pytest.fixture(scope="module")
def engine(artifact):
    need(web_model.available(), "tvmjs on Dawn (scripts/setup_emulators.sh webgpu web-runtime)")
    engine = web_model.WebEngine(artifact("tiny", "q0f32", target="webgpu"))
    yield engine
    engine.close()


def _top_p_reference(sorted_probs, sorted_ids, uniform, rows, top_p):
    """Sample i: the shortest prefix of row rows[i] whose mass reaches top_p, renormalised,
    read at uniform[i] (float64)."""
    out = []
    for u, r in zip(uniform, rows):
        total = np.cumsum(sorted_probs[r].astype(np.float64))
        kept = max(1, int(np.sum(total - sorted_probs[r] < top_p[r])))
        pick = min(int(np.sum(total <= u * total[kept - 1])), kept - 1)
        out.append(int(sorted_ids[r, pick]))
    return out


def test_metadata_names_our_parameters_and_a_hybrid_state(engine):
    meta = json.loads(engine.call("_metadata"))
    manifest = engine.manifest
    assert meta["kv_state_kind"] == "hybrid"
    text = manifest["entry_points"]["text"]
    assert [p["name"] for p in meta["params"]] == text["parameters"]
    assert {"batch_prefill", "batch_decode", "create_tir_paged_kv_cache"} <= set(text["functions"])
    chat = json.loads((engine.artifact / "mlc-chat-config.json").read_text())
    assert meta["prefill_chunk_size"] == chat["prefill_chunk_size"]
    assert chat["conv_template"]["stop_token_ids"] == chat["eos_token_id"]


def test_argsort_and_top_p_sampling_match_numpy(engine):
    vocab = engine.vocab_size
    rng = np.random.default_rng(3)
    probs = (rng.random((2, vocab)) ** 8).astype(np.float32)
    probs[:, 100:400] = probs[0, 7]  # ties: ordered by token id
    probs /= probs.sum(axis=1, keepdims=True)
    sorted_probs, sorted_ids = engine.call("argsort_probs", probs)
    order = np.argsort(-probs, axis=1, kind="stable")
    assert sorted_ids.dtype == np.int32 and np.array_equal(sorted_ids, order)
    assert np.array_equal(sorted_probs, np.take_along_axis(probs, order, axis=1))

    # u at the middle of a kept entry's interval, top_p between two prefix sums (no
    # float ties): samples from both rows, the first entry, a deep one, the greedy case
    total = np.cumsum(sorted_probs.astype(np.float64), axis=1)
    cases = []
    for row, keep, pick in [(0, 1, 0), (0, 40, 17), (1, 3000, 2999), (1, 500, 0)]:
        top_p = (total[row, keep - 2] + total[row, keep - 1]) / 2 if keep > 1 else 1e-5
        low = total[row, pick - 1] if pick else 0.0
        cases.append((row, top_p, (low + total[row, pick]) / 2 / total[row, keep - 1], pick))
    for row, top_p, u, pick in cases:
        tops = np.full(2, 0.5, np.float32)
        tops[row] = top_p
        got = engine.call(
            "sample_with_top_p",
            sorted_probs,
            sorted_ids,
            np.array([u], np.float32),
            np.array([row], np.int32),
            tops,
        )[0]
        want = _top_p_reference(sorted_probs, sorted_ids, [u], [row], tops)
        assert want == [int(sorted_ids[row, pick])]
        assert got.tolist() == want, (row, top_p, u, pick)


def test_softmax_and_logit_processors_match_numpy(engine):
    vocab = engine.vocab_size
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 3, (2, vocab)).astype(np.float32)

    temps = np.array([0.7, 1e-6], np.float32)  # WebLLM's greedy: temperature 0 -> 1e-6
    (probs,) = engine.call("softmax_with_temperature", logits[:, None, :], temps)
    z = logits.astype(np.float64) / temps[:, None]
    want = np.exp(z - z.max(axis=1, keepdims=True))
    want /= want.sum(axis=1, keepdims=True)
    assert np.abs(probs[:, 0, :] - want).max() <= 1e-6
    assert probs[1, 0].argmax() == logits[1].argmax() and probs[1, 0].max() > 0.999

    pos2seq, ids = np.array([0, 1, 1], np.int32), np.array([5, 7, 5], np.int32)
    bias = np.array([1.5, -2.0, 3.0], np.float32)
    (got,) = engine.call("apply_logit_bias_inplace", logits, pos2seq, ids, bias)
    want = logits.copy()
    np.add.at(want, (pos2seq, ids), bias)
    assert np.array_equal(got, want)

    seq_ids, counts = np.array([1, 0], np.int32), np.array([1, 2, 3], np.int32)
    penalties = np.array([[0.5, 0.1, 1.2], [0.3, 0.2, 0.8]], np.float32)
    (got,) = engine.call(
        "apply_penalty_inplace",
        logits,
        seq_ids,
        np.array([0, 0, 1], np.int32),
        np.array([3, 4, 3], np.int32),
        counts,
        penalties,
    )
    want = logits.copy()
    for s, t, c in zip([0, 0, 1], [3, 4, 3], counts):
        v = want[seq_ids[s], t] - (penalties[s, 0] + c * penalties[s, 1])
        want[seq_ids[s], t] = v * penalties[s, 2] if v < 0 else v / penalties[s, 2]
    assert np.allclose(got, want, rtol=1e-6, atol=0) and not np.array_equal(got, logits)

    mask = rng.integers(-(2**31), 2**31, (2, (vocab + 31) // 32), dtype=np.int64).astype(np.int32)
    (got,) = engine.call("apply_bitmask_inplace", logits, np.array([1], np.int32), mask)
    bits = (mask.view(np.uint32)[:, np.arange(vocab) // 32] >> (np.arange(vocab) % 32)) & 1
    # masked: the lowest float32 (WGSL prints it as a decimal literal: -3.4028231e38)
    masked = np.zeros_like(logits, dtype=bool)
    masked[1] = bits[1] == 0
    assert masked[1].any() and not masked[1].all()
    assert np.array_equal(got[~masked], logits[~masked]) and (got[masked] < -3.4e38).all()


def _browser_missing() -> str | None:
    return chromium_missing(PLAYWRIGHT, WEBLLM) or web_model.available()


def test_webllm_in_chromium_gives_the_host_tokens(artifact, tmp_path):
    need(_browser_missing(), "the WebLLM test (Chromium + playwright-core + web-llm + web runtime)")
    from tokenizers import Tokenizer

    from qwen35_mobile.bindings.model import chat_prompt

    web = artifact("tiny", "q0f32", target="webgpu")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(chat_prompt(PROMPT))
    proc = subprocess.run(
        [
            "node",
            str(DRIVER / "run_webllm.mjs"),
            str(web),
            str(prompt),
            str(NEW_TOKENS),
            str(BIAS_TOKEN),
            "--timeout",
            "1500",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "QWEN35_PLAYWRIGHT": str(PLAYWRIGHT), "QWEN35_WEBLLM": str(WEBLLM)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in out, (out["error"], out["console"])
    ids = (
        Tokenizer.from_file(str(web / "tokenizer.json"))
        .encode(chat_prompt(PROMPT), add_special_tokens=False)
        .ids
    )
    host = host_greedy(artifact("tiny", "q0f32"), ids, NEW_TOKENS)
    print(f"WebLLM tokens {out['greedy']['ids']}, host {host}; speed {out['stats']['extra']}")
    assert out["stats"]["prompt_tokens"] == len(ids)  # WebLLM's tokenizer = ours
    assert out["greedy"]["ids"] == host
    # logit_bias +100 on one token: WebLLM's processor and sampler ran on our functions,
    # and the comparison above tells those tokens from the host's
    assert out["biased"]["ids"] == [BIAS_TOKEN] * 2
    assert out["biased"]["ids"] != host[:2]
    assert out["chat"]["text"]  # a chat completion through the artifact's conv_template
