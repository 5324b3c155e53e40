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
    .venv/bin/python scripts/bench_vs_llamacpp.py --profile   # ours only, per kernel

The decode floor of each build (its weight bytes, which one decode step reads
once, divided by the measured read bandwidth of --threads threads) is printed
beside its decode figure, with the share of it reached.

``--profile`` skips llama.cpp and prints, per build, where a decode step's time
goes: every kernel and VM builtin call timed through the VM's instrument hook
(mean ms per step over --decode steps, after a 512-token prefill), largest
first, so that a schedule change is read as a before/after per kernel.
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
OURS = ["q4f16_i8", "q4f16_1", "q4f32_1", "q0f16"]
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


def read_bandwidth(threads: int) -> float:
    """GB/s of summing a 1 GiB array with ``threads`` threads (numpy, one chunk each).

    The reads a decode step does: weights streamed once, nothing written back.
    """
    import concurrent.futures

    import numpy as np

    data = np.ones(1 << 28, dtype=np.float32)
    chunks = np.array_split(data, threads)
    best = float("inf")
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            t = time.perf_counter()
            list(pool.map(np.sum, chunks))
            best = min(best, time.perf_counter() - t)
    return data.nbytes / best / 1e9


def weight_bytes(artifact: Path) -> int:
    """Bytes of the parameters in an artifact's tensor cache (text-only builds here)."""
    cache = json.loads((artifact / "tensor-cache.json").read_text())
    return int(cache["metadata"]["ParamBytes"])


def profile_ours(artifact: Path, prompt: int, decode: int, threads: int) -> str:
    """A table of the kernels of one decode step (mean ms over ``decode`` steps)."""
    code = f"""
import collections, json, time, numpy as np
from qwen35_mobile import Model
m = Model.load({str(artifact)!r}); e = m.engine
ids = [int(t) for t in np.random.default_rng(0).integers(0, 240000, {prompt})]
s = e.add_sequence(); lg = e.prefill(s, ids); tok = int(np.argmax(lg))
for _ in range(2): tok = int(np.argmax(e.decode([s], [tok])[0]))  # warm-up
spent, calls, start = collections.Counter(), collections.Counter(), {{}}
def instrument(func, name, before, ret, *args):
    if before:
        start[name] = time.perf_counter()
    else:
        spent[name] += time.perf_counter() - start.pop(name)
        calls[name] += 1
    return 0
e.vm.set_instrument(instrument)
t = time.perf_counter()
for _ in range({decode}): tok = int(np.argmax(e.decode([s], [tok])[0]))
step = (time.perf_counter() - t) / {decode}
print(json.dumps({{"step": step, "spent": spent, "calls": calls}}))
"""
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"profile run failed:\n{proc.stderr[-2000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    total = sum(got["spent"].values()) / decode
    lines = [
        f"{artifact.name}: {got['step'] * 1e3:.1f} ms per decode step with the hook "
        f"({total * 1e3:.1f} ms in timed calls), mean of {decode} steps after a {prompt}-token "
        "prefill",
        "",
        "| ms / step | calls / step | kernel or builtin |",
        "|---|---|---|",
    ]
    for name, sec in sorted(got["spent"].items(), key=lambda kv: -kv[1]):
        if sec / decode < 0.05e-3:
            continue
        lines.append(f"| {sec / decode * 1e3:.2f} | {got['calls'][name] / decode:g} | `{name}` |")
    return "\n".join(lines)


#: The CPU targets whose decode GEMV the instruction mix is read for (no phone can
#: be timed here: their machine code is the evidence).
MIX_TARGETS = {
    "x86-64 AVX2 (haswell)": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"},
    "x86-64 AVX-512 (skylake-avx512)": {
        "kind": "llvm",
        "mtriple": "x86_64-linux-gnu",
        "mcpu": "skylake-avx512",
    },
    "aarch64 NEON + fullfp16 + dotprod": {
        "kind": "llvm",
        "mtriple": "aarch64-linux-android",
        "mattr": ["+neon", "+fullfp16", "+dotprod"],
    },
}


def gemv_instruction_mix(quant: str = "q4f16_1", k: int = 1024, n: int = 3584) -> str:
    """Instructions per 32 weights in the hot loop of the decode GEMV, per CPU target.

    The one-row ``QuantizedLinear`` (k -> n) is built as the model's layers are;
    its assembly's innermost loop holding the FMAs is counted by mnemonic, and
    scaled by the weights one iteration covers (FMAs x vector lanes).
    """
    import collections
    import re

    import tvm
    from tvm.relax.frontend import nn
    from tvm.target import Target

    from qwen35_mobile.compile.model.quantized import QuantizedLinear
    from qwen35_mobile.compile.schedule_cpu import cpu_pipeline, vector_bits

    dtype = "float16" if quant.endswith("f16_1") else "float32"

    class Layer(nn.Module):
        def __init__(self):
            self.proj = QuantizedLinear(k, n, quant, "float32")

        def decode(self, x: nn.Tensor):
            return self.proj(x)

    spec = {
        "decode": {
            "x": nn.spec.Tensor([1, 1, k], dtype),
            "$": {"param_mode": "packed", "effect_mode": "none"},
        }
    }
    lines = [
        f"decode GEMV ({quant}, 1 x {k} @ {n} x {k}): instructions per 32 weights in its hot loop",
        "",
        "| target | per 32 weights | FMAs | of which: top mnemonics |",
        "|---|---|---|---|",
    ]
    for label, spec_target in MIX_TARGETS.items():
        target = Target(spec_target)
        mod, _ = Layer().export_tvm(spec=spec)
        ex = tvm.compile(mod, target, relax_pipeline=cpu_pipeline(target))
        libs = [ex.mod, *ex.mod.imports]
        asm = next(m.inspect_source("asm") for m in libs if "dequantize" in m.inspect_source("asm"))
        body = _hot_loop(asm)
        mnemonics = collections.Counter(
            line.split()[0] for line in body if line and not line.startswith((".", "#", "//"))
        )
        fma = sum(c for m, c in mnemonics.items() if re.match(r"v?fma|vfmadd|fmla", m))
        lanes = vector_bits(target) // 32
        weights = fma * lanes
        per32 = sum(mnemonics.values()) * 32 / weights if weights else float("nan")
        top = ", ".join(f"{m} {c * 32 / weights:.2g}" for m, c in mnemonics.most_common(6))
        lines.append(f"| {label} | {per32:.1f} | {fma} x {lanes} lanes | {top} |")
    return "\n".join(lines)


def q8_instruction_mix(k: int = 1024, n: int = 3584) -> str:
    """The same count for q4f16_i8's int8 GEMV (compile/kernels/q8_gemv.py): per 32 weights
    in the innermost loop holding its integer dot products (x86: one ``vpmaddubsw`` per 32
    weights; aarch64: two ``sdot``)."""
    import collections

    import tvm
    from tvm.target import Target

    from qwen35_mobile.compile.kernels import q8_gemv

    lines = [
        f"decode GEMV (q4f16_i8, 1 x {k} @ {n} x {k}): instructions per 32 weights in its hot loop",
        "",
        "| target | per 32 weights | dot products | of which: top mnemonics |",
        "|---|---|---|---|",
    ]
    for label, spec_target in MIX_TARGETS.items():
        target = Target(spec_target)
        if q8_gemv.isa_of(target) is None:
            lines.append(f"| {label} | - | - | no int8 kernel for this target (q4f16_i8 refused) |")
            continue
        func = q8_gemv.gemv_func(n, k, "float16", "float16", target)
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
        dot, per_group = (
            ("sdot", 2) if q8_gemv.isa_of(target) == q8_gemv.NEON_DOTPROD else ("vpmaddubsw", 1)
        )
        body = _hot_loop(lib.mod.inspect_source("asm"), dot)
        mnemonics = collections.Counter(
            line.split()[0] for line in body if line and not line.startswith((".", "#", "//"))
        )
        groups = mnemonics[dot] / per_group  # groups of 32 weights in the loop
        per32 = sum(mnemonics.values()) / groups if groups else float("nan")
        top = ", ".join(f"{m} {c / groups:.2g}" for m, c in mnemonics.most_common(6))
        lines.append(f"| {label} | {per32:.1f} | {mnemonics[dot]} {dot} | {top} |")
    return "\n".join(lines)


def _hot_loop(asm: str, marker: str = r"v?fma|vfmadd|fmla") -> list[str]:
    """The instructions of the innermost loop (a label branched back to) holding an
    instruction matching ``marker`` (FMAs by default)."""
    import re

    lines = [ln.strip() for ln in asm.splitlines()]
    labels = {ln[:-1]: i for i, ln in enumerate(lines) if re.match(r"^\.?L\w+:$", ln)}
    best: list[str] | None = None
    for i, ln in enumerate(lines):
        parts = ln.split()
        if len(parts) < 2 or not parts[0].startswith(("j", "b")):
            continue
        target = parts[-1]
        start = labels.get(target)
        if start is None or start >= i:
            continue
        body = [x for x in lines[start + 1 : i + 1] if x and not x.endswith(":")]
        if any(re.match(marker, x.split()[0]) for x in body) and (
            best is None or len(body) < len(best)
        ):
            best = body
    return best or []


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
    parser.add_argument(
        "--quants",
        default=",".join(OURS),
        help=f"our builds to time, comma-separated (default {','.join(OURS)})",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="skip llama.cpp; print where a decode step of each of our builds spends its time",
    )
    args = parser.parse_args()

    from qwen35_mobile.compile.compiler import compile_model
    from qwen35_mobile.parity.checkpoint import ensure_checkpoint

    args.out.mkdir(parents=True, exist_ok=True)
    cpu = cpu_description()
    print(f"CPU: {cpu}; {args.threads} threads", flush=True)
    checkpoint = ensure_checkpoint(args.preset, args.out, dtype="bfloat16")
    ours = {}
    for quant in args.quants.split(","):
        artifact = args.out / f"{args.preset}-{quant}"
        if not (artifact / "manifest.json").exists():
            compile_model(str(checkpoint), "host", quant, artifact, force=True, vision=False)
        ours[quant] = artifact
    if args.profile:
        for artifact in ours.values():
            print("\n" + profile_ours(artifact, args.prompt, args.decode, args.threads), flush=True)
        print("\n" + gemv_instruction_mix(), flush=True)
        print("\n" + q8_instruction_mix(), flush=True)
        return
    bandwidth = read_bandwidth(args.threads)
    print(f"read bandwidth ({args.threads} threads): {bandwidth:.1f} GB/s", flush=True)
    build = llama_cpp(args.cache)
    ggufs = gguf_files(build, checkpoint, args.out)
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
    sizes = {f"ours {q}": weight_bytes(a) for q, a in ours.items()}
    sizes |= {f"llama.cpp {q}": p.stat().st_size for q, p in ggufs.items()}
    lines = [
        f"{args.preset}, random weights; CPU: {cpu}; {args.threads} threads; "
        f"medians of {args.rounds} interleaved rounds; read bandwidth {bandwidth:.1f} GB/s",
        "",
        f"| system | prefill {args.prompt} tok/s | decode tok/s | vs llama.cpp Q4_0 "
        "(prefill / decode) | decode floor tok/s (weights MB) | of floor | peak MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        floor = bandwidth * 1e9 / sizes[r["system"]]
        lines.append(
            f"| {r['system']} | {r['prefill']:.1f} | {r['decode']:.2f} | "
            f"{r['prefill'] / base['prefill']:.2f}x / {r['decode'] / base['decode']:.2f}x | "
            f"{floor:.1f} ({sizes[r['system']] / 1e6:.0f}) | {r['decode'] / floor:.0%} | "
            f"{r['peak_mb']:.0f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    (args.out / "table.md").write_text(table + "\n")
    bar_chart(rows, args.out / "chart.png", f"{args.preset}: {cpu}")
    print(f"\nwrote {args.out / 'table.md'} and {args.out / 'chart.png'}")


if __name__ == "__main__":
    main()
