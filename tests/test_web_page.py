"""`qwen35-mobile serve`: the chat page in a real browser (headless Chromium, WebGPU on
SwiftShader, so a float32 build). It loads model.wasm with tvmjs, the weights with
tvmjs's tensor cache and the tokenizer with @mlc-ai/web-tokenizers, generates 16
greedy tokens for a fixed prompt, and they must be the host build's tokens; then the
same again with the browser offline (service worker + tvmjs's Cache API).

Needs Chromium, playwright-core, the page's tokenizer (scripts/setup_emulators.sh
browser) and the web runtime: skips naming what is missing, fails under CI=true.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from conftest import chromium_missing, host_greedy, need
from PIL import Image

from qwen35_mobile.bindings import web_page, web_runtime
from qwen35_mobile.errors import UserError

DRIVER = Path(web_page.__file__).resolve().parents[2] / "parity" / "emulators" / "browser"
PLAYWRIGHT = web_page.BROWSER_MODULES / "playwright-core" / "index.js"
PROMPT = "What is the capital of France?"
NEW_TOKENS = 16


def _browser_missing() -> str | None:
    return chromium_missing(PLAYWRIGHT, web_page.tokenizers_js()) or web_runtime.why_unavailable()


def test_chat_page_in_chromium_gives_the_host_tokens(artifact, tmp_path):
    need(_browser_missing(), "the browser test (Chromium + playwright-core + the web runtime)")
    from tokenizers import Tokenizer

    from qwen35_mobile.bindings.model import chat_prompt

    web = artifact("tiny", "q0f32", target="webgpu")
    url, server = web_page.serve_in_background(web)
    shot = tmp_path / "page.png"
    try:
        proc = subprocess.run(
            [
                "node",
                str(DRIVER / "run_page.mjs"),
                f"{url}?prompt={quote(PROMPT)}&max={NEW_TOKENS}",
                "--screenshot",
                str(shot),
                "--offline-rerun",
            ],
            capture_output=True,
            text=True,
            timeout=1800,
            env={**os.environ, "QWEN35_PLAYWRIGHT": str(PLAYWRIGHT)},
        )
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ids = (
        Tokenizer.from_file(str(web / "tokenizer.json"))
        .encode(chat_prompt(PROMPT), add_special_tokens=False)
        .ids
    )
    host = host_greedy(artifact("tiny", "q0f32"), ids, NEW_TOKENS)
    for run in ("online", "offline"):
        got = out[run]
        assert "error" not in got, (run, got.get("error"), out["console"])
        assert got["prompt_ids"] == ids, run  # the page's tokenizer = the host's
        assert got["tokens"] == host, (run, got["tokens"], host)
        assert got["prefill_tps"] > 0 and got["decode_tps"] > 0
        assert "tok/s" in got["speed"] and PROMPT in got["shown"]
    image = np.asarray(Image.open(shot).convert("L"))
    assert image.shape[1] >= 800 and (image < 128).mean() > 0.005  # text drawn, not a blank page


def test_serve_refuses_what_it_cannot_serve(artifact, tmp_path):
    with pytest.raises(UserError, match="needs a webgpu artifact with model.wasm"):
        web_page.page_files(artifact("tiny", "q0f32"))  # a host build
    with pytest.raises(UserError, match="no readable manifest.json"):
        web_page.page_files(tmp_path)
