"""WebGPU speed as a page gets it, beside our host CPU build in the same run (issue 12).

Compiles one random checkpoint at a real Qwen3.5 shape for ``webgpu`` (model.wasm,
needs ``scripts/setup_emulators.sh webgpu web-runtime``) and for ``host``, then times
prefill (--prompt tokens, last-position logits as a page asks) and decode (--decode
greedy tokens) of both: the web build through tvmjs in Node on Dawn over Mesa
lavapipe (parity/emulators/web_model.py), the host build through the bindings.
The first call of each kind compiles the shaders and is timed apart ("warm-up").
Both software GPUs and the CPU share the same cores, so the figure to read is the
ratio to the host build measured here, not the absolute tokens/s.

``--browser`` adds the chat page of ``qwen35-mobile serve`` in headless Chromium on
SwiftShader (scripts/setup_emulators.sh browser; float32 builds only: SwiftShader has no
shader-f16): the page's own prefill/decode tokens/s for a text prompt of about
--prompt tokens, the second of two turns (the first compiles the shaders).

Per decode step the only device-to-host copy is the logits row the host samples
from (run_model.mjs: ``toFile(logits)`` after the step; the KV cache, the RNN state
and every activation stay in GPU buffers); the table gives its bytes per step.

    .venv/bin/python scripts/bench_web.py [--preset qwen3.5-0.8b] [--quant q4f32_1] [--browser]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="qwen3.5-0.8b")
    parser.add_argument(
        "--quant", default="q4f32_1", help="lavapipe has shader-f16; SwiftShader not"
    )
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("build/bench-web"))
    parser.add_argument(
        "--browser", action="store_true", help="also the chat page in Chromium/SwiftShader"
    )
    args = parser.parse_args()

    from bench_host import time_engine
    from bench_vs_llamacpp import cpu_description

    from qwen35_mobile import Model
    from qwen35_mobile.compile.compiler import compile_model
    from qwen35_mobile.parity.checkpoint import ensure_checkpoint
    from qwen35_mobile.parity.emulators import web_model

    why = web_model.available()
    if why:
        raise SystemExit(f"cannot run the web build here: {why}")
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = cpu_description()
    print(f"CPU: {cpu}", flush=True)
    checkpoint = ensure_checkpoint(args.preset, args.out, dtype="bfloat16")
    builds = {}
    for target in ("webgpu", "host"):
        out = args.out / f"{args.preset}-{target}-{args.quant}"
        if not (out / "manifest.json").exists():
            print(f"compiling {target} {args.quant}", flush=True)
            compile_model(str(checkpoint), target, args.quant, out, force=True, vision=False)
        builds[target] = out
    web = web_model.WebEngine(builds["webgpu"])
    adapter = (web.opened.get("adapter") or {}).get("description", "?")
    print(f"web: model.wasm + weights loaded by tvmjs in {web.opened['seconds']:.1f} s", flush=True)
    ids = [int(t) for t in np.random.default_rng(0).integers(0, 240000, args.prompt)]
    try:
        got_web = time_engine(web, ids, args.decode)
    finally:
        web.close()
    got_page = page_speed(builds["webgpu"], args.prompt, args.decode) if args.browser else None
    got_host = time_engine(Model.load(builds["host"]).engine, ids, args.decode)
    manifest = json.loads((builds["webgpu"] / "manifest.json").read_text())
    vocab = json.loads((builds["webgpu"] / "mlc-chat-config.json").read_text())["vocab_size"]
    lines = [
        f"{args.preset} {args.quant}, random weights; CPU: {cpu}; WebGPU: Dawn (npm webgpu) on "
        f"{adapter}; prompt {args.prompt}, decode {args.decode}; model.wasm "
        f"{manifest['wasm_bytes'] / 2**20:.1f} MiB",
        "",
        "| build | prefill tok/s | decode tok/s | vs host (prefill / decode) | warm-up s | host copy per decode step |",
        "|---|---|---|---|---|---|",
    ]
    copy = f"{vocab * 4 / 1024:.0f} KiB (the logits row)"
    rows = [("webgpu (tvmjs, Dawn/lavapipe)", got_web, copy)]
    if got_page:
        rows.append(
            (
                f"webgpu (chat page, Chromium/SwiftShader; prompt {got_page['prompt']})",
                got_page,
                copy,
            )
        )
    rows.append(("host CPU", got_host, "-"))
    for name, got, host_copy in rows:
        lines.append(
            f"| {name} | {got['prefill']:.2f} | {got['decode']:.2f} | "
            f"{got['prefill'] / got_host['prefill']:.2f}x / {got['decode'] / got_host['decode']:.2f}x | "
            f"{got['warm_up_s']:.0f} | {host_copy} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    (args.out / "table.md").write_text(table + "\n")


def page_speed(artifact: Path, prompt_tokens: int, decode: int) -> dict:
    """The chat page's tokens/s in headless Chromium (SwiftShader): two turns of a text
    prompt of about ``prompt_tokens`` tokens, the second one's speeds."""
    import subprocess
    from urllib.parse import quote

    from qwen35_mobile.bindings import web_page

    manifest = json.loads((artifact / "manifest.json").read_text())
    if manifest["dtype"] != "float32":
        raise SystemExit("--browser: SwiftShader has no shader-f16; use a float32 build")
    driver = Path(__file__).resolve().parents[1] / "parity" / "emulators" / "browser"
    playwright = web_page.BROWSER_MODULES / "playwright-core" / "index.js"
    text = " ".join(["hello"] * max(1, prompt_tokens - 10))  # + the chat template's tokens
    url, server = web_page.serve_in_background(artifact)
    print("web: the chat page in Chromium/SwiftShader (two turns)", flush=True)
    try:
        proc = subprocess.run(
            [
                "node",
                str(driver / "run_page.mjs"),
                f"{url}?prompt={quote(text)}&max={decode + 1}&runs=2&nosw",
                "--timeout",
                "36000",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "QWEN35_PLAYWRIGHT": str(playwright)},
        )
    finally:
        server.shutdown()
    if proc.returncode != 0:
        raise SystemExit(f"the page run failed: {proc.stderr[-2000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])["online"]
    if "error" in got:
        raise SystemExit(f"the page failed: {got['error']}")
    first = got["first"]
    # warm-up: what the first turn's compiles cost over the second turn, in seconds
    n = len(got["prompt_ids"])
    warm = n / first["prefill_tps"] - n / got["prefill_tps"]
    warm += decode / first["decode_tps"] - decode / got["decode_tps"]
    return {
        "prefill": got["prefill_tps"],
        "decode": got["decode_tps"],
        "warm_up_s": max(0.0, warm),
        "prompt": n,
    }


if __name__ == "__main__":
    main()
