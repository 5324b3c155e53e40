"""Side by side with llama.cpp on the same weights (issue 13's benchmark).

Builds llama.cpp from the tree vendored in the PyPI sdist of
``llama-cpp-python`` (``pip download --no-binary :all:``; cmake + a C++
compiler, ``-DGGML_NATIVE=ON``), converts one random checkpoint at a real
Qwen3.5 shape to GGUF (F16, then Q4_0 and Q8_0 with ``llama-quantize``),
compiles our host builds of the same checkpoint, and times prefill (--prompt
tokens) and decode (--decode tokens) for every system **interleaved** (A B C
... A B C ..., --rounds rounds, medians), each measurement in a process of its
own so that its peak resident memory is its own.  Prints the CPU and its ISA,
writes a markdown table and a PNG bar chart into --out.

    .venv/bin/python scripts/bench_vs_llamacpp.py [--preset qwen3.5-0.8b] [--threads 2]

The decode floor (bytes one decode step reads / measured read bandwidth) is
printed beside our decode figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
LLAMA_CPP_PYTHON = "0.3.36"
OURS = ["q4f16_1", "q4f32_1", "q0f16"]
LLAMA = ["Q4_0", "Q8_0"]


def cpu_description() -> str:
    info = Path("/proc/cpuinfo").read_text()
    name = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "?"
    )
    flags = set(
        next(
            (ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []
        )
    )
    isa = [
        f
        for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16")
        if f in flags
    ]
    return f"{name}, {os.cpu_count()} cores, {' '.join(isa) or 'no AVX2'}"


def llama_cpp(cache: Path) -> Path:
    """The build directory of llama.cpp (llama-bench, llama-quantize), built once."""
    src = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    build = src / "build"
    if (build / "bin" / "llama-bench").exists():
        return build
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                "-d",
                str(cache),
            ],
            check=True,
        )
    if not src.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
    subprocess.run(
        [
            "cmake",
            "-S",
            str(src),
            "-B",
            str(build),
            "-DGGML_NATIVE=ON",
            "-DLLAMA_CURL=OFF",
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_SERVER=OFF",
        ],
        check=True,
    )
    subprocess.run(
        [
            "cmake",
            "--build",
            str(build),
            "--target",
            "llama-bench",
            "llama-quantize",
            "-j",
            str(os.cpu_count() or 1),
        ],
        check=True,
    )
    return build


def gguf_files(build: Path, checkpoint: Path, out: Path) -> dict[str, Path]:
    src = build.parent
    f16 = out / "model-F16.gguf"
    if not f16.exists():
        env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
        subprocess.run(
            [
                sys.executable,
                str(src / "convert_hf_to_gguf.py"),
                str(checkpoint),
                "--outtype",
                "f16",
                "--outfile",
                str(f16),
            ],
            check=True,
            env=env,
        )
    files = {}
    for q in LLAMA:
        path = out / f"model-{q}.gguf"
        if not path.exists():
            subprocess.run(
                [str(build / "bin" / "llama-quantize"), str(f16), str(path), q], check=True
            )
        files[q] = path
    return files


def time_llama(build: Path, gguf: Path, prompt: int, decode: int, threads: int) -> dict:
    cmd = [
        str(build / "bin" / "llama-bench"),
        "-m",
        str(gguf),
        "-p",
        str(prompt),
        "-n",
        str(decode),
        "-t",
        str(threads),
        "-r",
        "1",
        "-o",
        "json",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"llama-bench failed:\n{proc.stderr[-2000:]}")
    rows = json.loads(proc.stdout)
    peak_kb = int(proc.stderr.strip().splitlines()[-1])
    speed = {("prefill" if r["n_prompt"] else "decode"): r["avg_ts"] for r in rows}
    return {**speed, "peak_mb": peak_kb / 1024, "wall_s": time.perf_counter() - t0}


def time_ours(artifact: Path, prompt: int, decode: int, threads: int) -> dict:
    code = f"""
import json, time, numpy as np
from qwen35_mobile import Model
m = Model.load({str(artifact)!r}); e = m.engine
ids = [int(t) for t in np.random.default_rng(0).integers(0, 240000, {prompt})]
s = e.add_sequence(); e.prefill(s, ids[:8]); e.remove_sequence(s)  # warm-up
s = e.add_sequence(); t = time.perf_counter(); lg = e.prefill(s, ids); p = time.perf_counter() - t
tok = int(np.argmax(lg)); t = time.perf_counter()
for _ in range({decode}): tok = int(np.argmax(e.decode([s], [tok])[0]))
d = time.perf_counter() - t
print(json.dumps({{"prefill": {prompt} / p, "decode": {decode} / d}}))
"""
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode:
        raise SystemExit(f"our run failed:\n{proc.stderr[-2000:]}")
    speed = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**speed, "peak_mb": int(proc.stderr.strip().splitlines()[-1]) / 1024}


def bar_chart(rows: list[dict], path: Path, title: str) -> None:
    """Prefill and decode tok/s per system, two panels, drawn with Pillow."""
    from PIL import Image, ImageDraw

    width, height, left = 900, 420, 150
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black")
    for panel, key in enumerate(("prefill", "decode")):
        top = 40 + panel * 190
        top_value = max(r[key] for r in rows) or 1
        draw.text((10, top), f"{key} tok/s", fill="black")
        for i, r in enumerate(rows):
            y = top + 20 + i * 26
            length = (width - left - 80) * r[key] / top_value
            colour = (40, 90, 200) if r["system"].startswith("ours") else (230, 130, 20)
            draw.text((10, y + 4), r["system"], fill="black")
            draw.rectangle([left, y, left + length, y + 18], fill=colour)
            draw.text((left + length + 6, y + 4), f"{r[key]:.1f}", fill="black")
    img.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="qwen3.5-0.8b")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path("build/bench-vs-llamacpp"))
    parser.add_argument(
        "--cache", type=Path, default=Path.home() / ".cache" / "qwen35_mobile" / "llamacpp"
    )
    args = parser.parse_args()

    from qwen35_mobile.compile.compiler import compile_model
    from qwen35_mobile.parity.checkpoint import ensure_checkpoint

    args.out.mkdir(parents=True, exist_ok=True)
    cpu = cpu_description()
    print(f"CPU: {cpu}; {args.threads} threads", flush=True)
    build = llama_cpp(args.cache)
    checkpoint = ensure_checkpoint(args.preset, args.out, dtype="bfloat16")
    ggufs = gguf_files(build, checkpoint, args.out)
    ours = {}
    for quant in OURS:
        artifact = args.out / f"{args.preset}-{quant}"
        if not (artifact / "manifest.json").exists():
            compile_model(str(checkpoint), "host", quant, artifact, force=True, vision=False)
        ours[quant] = artifact
    systems = {f"llama.cpp {q}": ("llama", p) for q, p in ggufs.items()}
    systems |= {f"ours {q}": ("ours", a) for q, a in ours.items()}
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    for r in range(args.rounds):
        for name, (kind, path) in systems.items():
            timer = time_llama if kind == "llama" else time_ours
            if kind == "llama":
                got = timer(build, path, args.prompt, args.decode, args.threads)
            else:
                got = timer(path, args.prompt, args.decode, args.threads)
            runs[name].append(got)
            print(
                f"round {r + 1} {name}: prefill {got['prefill']:.1f}, decode {got['decode']:.2f} "
                f"tok/s, peak {got['peak_mb']:.0f} MB",
                flush=True,
            )
    rows = [
        {
            "system": name,
            **{k: statistics.median(x[k] for x in v) for k in ("prefill", "decode", "peak_mb")},
        }
        for name, v in runs.items()
    ]
    base = next(r for r in rows if r["system"] == "llama.cpp Q4_0")
    lines = [
        f"{args.preset}, random weights; CPU: {cpu}; {args.threads} threads; "
        f"medians of {args.rounds} interleaved rounds",
        "",
        f"| system | prefill {args.prompt} tok/s | decode tok/s | vs llama.cpp Q4_0 (prefill / decode) | peak MB |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['system']} | {r['prefill']:.1f} | {r['decode']:.2f} | "
            f"{r['prefill'] / base['prefill']:.2f}x / {r['decode'] / base['decode']:.2f}x | {r['peak_mb']:.0f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    (args.out / "table.md").write_text(table + "\n")
    bar_chart(rows, args.out / "chart.png", f"{args.preset}: {cpu}")
    print(f"\nwrote {args.out / 'table.md'} and {args.out / 'chart.png'}")


if __name__ == "__main__":
    main()
