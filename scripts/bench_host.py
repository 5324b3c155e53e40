"""Host-CPU benchmark: the compiled model against transformers, same weights.

At the real Qwen3.5-0.8B shape (random weights), measures in one run:
prefill tokens/s (one prompt of --prompt-tokens) and decode tokens/s (one
sequence, --decode-tokens steps) for the compiled artifact and for
transformers (PyTorch CPU, fp32), prints their ratios, and the decode floor
set by memory bandwidth: bytes read per token / measured read bandwidth.

    .venv/bin/python scripts/bench_host.py [--preset qwen3.5-0.8b] [--quant q0f32]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of a streaming read on all cores (torch sum of a large float32
    array, multi-threaded; best of N)."""
    import torch

    a = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def time_engine(engine, prompt: list[int], steps: int) -> dict:
    """Prefill and greedy-decode tokens/s of an engine (the bindings' or another with its
    interface); the first calls of each (allocations, shader compilation) are timed apart."""
    seq = engine.add_sequence()
    t = time.perf_counter()
    engine.prefill(seq, prompt[:8])  # warm-up: first-call allocations, shaders
    engine.decode([seq], [1])
    warm = time.perf_counter() - t
    engine.remove_sequence(seq)
    seq = engine.add_sequence()
    t = time.perf_counter()
    logits = engine.prefill(seq, prompt)
    prefill = time.perf_counter() - t
    token = int(np.argmax(logits))
    t = time.perf_counter()
    for _ in range(steps):
        token = int(np.argmax(engine.decode([seq], [token])[0]))
    decode = time.perf_counter() - t
    engine.remove_sequence(seq)
    return {"prefill": len(prompt) / prefill, "decode": steps / decode, "warm_up_s": warm}


def time_ours(artifact: Path, prompt: list[int], steps: int) -> tuple[float, float]:
    from qwen35_mobile import Model

    got = time_engine(Model.load(artifact).engine, prompt, steps)
    return got["prefill"], got["decode"]


def time_reference(checkpoint: Path, prompt: list[int], steps: int) -> tuple[float, float, int]:
    import torch

    from qwen35_mobile.parity.reference import Reference

    ref = Reference(checkpoint)
    ref.logits(prompt[:8])  # warm-up
    t = time.perf_counter()
    logits, cache = ref.logits(prompt)
    prefill = time.perf_counter() - t
    token = int(np.argmax(logits[-1]))
    t = time.perf_counter()
    for _ in range(steps):
        logits, cache = ref.logits([token], cache)
        token = int(np.argmax(logits[-1]))
    decode = time.perf_counter() - t
    return len(prompt) / prefill, steps / decode, torch.get_num_threads()


def decode_bytes(manifest: dict, config) -> int:
    """Bytes one decode step must read: every weight (the tied embedding is
    read whole by the LM head; the embedding lookup itself reads one row) and
    the DeltaNet states (read and written)."""
    sizes = {"float32": 4, "float16": 2, "uint32": 4}
    nbytes = {
        p["name"]: int(np.prod(p["shape"])) * sizes[p["dtype"]] for p in manifest["parameters"]
    }
    weights = sum(nbytes.values())
    if not config.tie_word_embeddings:  # the table itself is only gathered from
        weights -= sum(n for name, n in nbytes.items() if name.startswith("embed_tokens."))
    states = (
        len(config.linear_attention_layers)
        * config.linear_value_dim
        * config.linear_key_head_dim
        * 4
        * 2
    )
    return weights + states


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="qwen3.5-0.8b")
    parser.add_argument("--quant", default="q0f32")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument(
        "--workdir",
        default=None,
        help="keep the checkpoint and artifact here (default: a temp dir)",
    )
    args = parser.parse_args()

    from qwen35_mobile.compile.compiler import compile_model
    from qwen35_mobile.compile.config import preset
    from qwen35_mobile.parity.checkpoint import ensure_checkpoint

    config = preset(args.preset)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-host-"))
    print(f"checkpoint: random {args.preset} ({config.num_params() / 1e9:.2f}B text params)")
    t = time.perf_counter()
    ckpt = ensure_checkpoint(args.preset, work, dtype="bfloat16")
    print(f"  ready in {time.perf_counter() - t:.1f} s: {ckpt}")
    artifact = work / f"{args.preset}-{args.quant}"
    if not (artifact / "manifest.json").exists():
        t = time.perf_counter()
        compile_model(str(ckpt), "host", args.quant, artifact, force=True)
        print(f"  compiled in {time.perf_counter() - t:.1f} s")
    manifest = json.loads((artifact / "manifest.json").read_text())
    prompt = list(np.random.default_rng(0).integers(0, 240000, size=args.prompt_tokens))

    ours_prefill, ours_decode = time_ours(artifact, prompt, args.decode_tokens)
    ref_prefill, ref_decode, threads = time_reference(ckpt, prompt, args.decode_tokens)
    bandwidth = read_bandwidth()
    nbytes = decode_bytes(manifest, config)
    floor = nbytes / bandwidth

    print(
        f"\n{args.preset} {args.quant} on {os.cpu_count()} cores (torch threads {threads}); all figures from this run"
    )
    print(f"{'':28s}{'compiled':>12s}{'transformers':>14s}{'ratio':>8s}")
    print(
        f"{'prefill tok/s (' + str(args.prompt_tokens) + ' tokens)':28s}{ours_prefill:12.1f}{ref_prefill:14.1f}"
        f"{ours_prefill / ref_prefill:8.2f}"
    )
    print(
        f"{'decode tok/s':28s}{ours_decode:12.2f}{ref_decode:14.2f}{ours_decode / ref_decode:8.2f}"
    )
    print(
        f"\nmemory read bandwidth: {bandwidth / 1e9:.1f} GB/s; bytes per decoded token: {nbytes / 1e9:.2f} GB"
    )
    print(
        f"decode floor: {floor * 1e3:.0f} ms/token ({1 / floor:.2f} tok/s); compiled decode reaches "
        f"{ours_decode * floor:.0%} of it"
    )


if __name__ == "__main__":
    main()
