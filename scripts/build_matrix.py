#!/usr/bin/env python3
"""Build the device model libraries of the real Qwen3.5 sizes from presets alone.

    .venv/bin/python scripts/build_matrix.py                        # the whole matrix
    .venv/bin/python scripts/build_matrix.py --models qwen3.5-0.8b --quants q0f16
    .venv/bin/python scripts/build_matrix.py --targets android ios --out build/matrix

Each build is ``qwen35-mobile compile --model PRESET --target T --quant Q`` without
weights (the library only); its artifact directory is OUT/<model>-<target>-<quant>.
The compile time and the library size are printed; the build records them in
``build-info.json`` (``library_compile_seconds``) and the manifest
(``library_bytes``); a summary goes to
OUT/matrix.json (merged with earlier runs).  Builds that already exist are
skipped unless --force.  Exit status 1 if any build failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

MODELS = ["qwen3.5-0.8b", "qwen3.5-2b", "qwen3.5-4b", "qwen3.5-9b"]
TARGETS = ["android", "ios", "webgpu"]
QUANTS = ["q0f16", "q0f32"]


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _static_checks(library: Path, target: str, quant: str) -> str:
    from qwen35_mobile.errors import UserError
    from qwen35_mobile.parity import static_checks as sc

    if not library.name.endswith(".tar"):
        return ""
    source = sc.device_source(library)
    try:
        symbols = sc.check_symbols(library)
    except sc.CheckUnavailable as err:
        symbols = f"symbols: check skipped: {err}"
    except UserError as err:
        return f"CHECK FAILED: {err}"
    try:
        return symbols + "; " + _device_check(source, target, quant)
    except sc.CheckUnavailable as err:
        return f"{symbols}; check skipped: {err}"
    except UserError as err:
        return f"{symbols}; CHECK FAILED: {err}"


def _device_check(source: str, target: str, quant: str) -> str:
    from qwen35_mobile.errors import UserError
    from qwen35_mobile.parity import static_checks as sc

    if target == "android" and quant == "q0f32":  # PoCL has no fp16
        return "opencl: " + sc.check_opencl(source)
    if target == "ios":
        return "metal: " + sc.check_metal(source)
    if target == "webgpu":
        over = {
            k: n
            for k, n in sc.wgsl_storage_buffers(source).items()
            if n > sc.WEBGPU_MAX_STORAGE_BUFFERS
        }
        if over:
            raise UserError(
                f"wgsl: kernels over {sc.WEBGPU_MAX_STORAGE_BUFFERS} storage buffers: {over}"
            )
        return (
            f"wgsl: at most {sc.WEBGPU_MAX_STORAGE_BUFFERS} storage buffers; "
            + sc.check_wgsl_dawn(source)
        )
    return "no device check for this build"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--targets", nargs="+", default=TARGETS)
    parser.add_argument("--quants", nargs="+", default=QUANTS)
    parser.add_argument("--out", type=Path, default=Path("build/matrix"))
    parser.add_argument("--force", action="store_true", help="rebuild existing artifacts")
    parser.add_argument(
        "--no-vision",
        action="store_true",
        help="text-only libraries (no image_embed), named <model>-<target>-<quant>-novision",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="static checks: OpenCL C of fp32 android builds on PoCL (needs pyopencl), Metal kernels through a clang "
        "syntax check (needs clang), WGSL storage buffers per kernel and shader modules on Dawn (npm webgpu)",
    )
    args = parser.parse_args(argv)

    from qwen35_mobile.bindings.artifact import read_build_info, read_manifest
    from qwen35_mobile.compile.compiler import compile_model

    args.out.mkdir(parents=True, exist_ok=True)
    summary_path = args.out / "matrix.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    failed = []
    for model in args.models:
        for target in args.targets:
            for quant in args.quants:
                name = f"{model}-{target}-{quant}" + ("-novision" if args.no_vision else "")
                out = args.out / name
                started = time.time()
                try:
                    if out.exists() and not args.force:
                        manifest = read_manifest(out)
                        note = "(existing)"
                    else:
                        manifest = compile_model(
                            model,
                            target,
                            quant,
                            out,
                            force=args.force,
                            progress=lambda _: None,
                            vision=not args.no_vision,
                        )
                        note = ""
                except Exception as err:  # keep going: report every failing cell
                    failed.append(name)
                    summary[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000]}
                    print(
                        f"{name:36s} FAILED after {time.time() - started:.0f} s: {str(err).splitlines()[0][:200]}",
                        flush=True,
                    )
                    traceback.print_exc(limit=3)
                    continue
                seconds = (read_build_info(out) or {}).get("library_compile_seconds", float("nan"))
                summary[name] = {
                    "ok": True,
                    "model": model,
                    "target": target,
                    "quantization": quant,
                    "compile_seconds": seconds,
                    "library_bytes": manifest["library_bytes"],
                    "image_embed": "vision" in manifest.get("entry_points", {}),
                    "library": str(out / manifest["library"]),
                }
                if args.check:
                    summary[name]["checks"] = check = _static_checks(
                        out / manifest["library"], target, quant
                    )
                    note = f"{note} {check}".strip()
                vision = "image_embed" if summary[name]["image_embed"] else "text only"
                print(
                    f"{name:36s} compile {seconds:7.1f} s  library "
                    f"{_size(manifest['library_bytes']):>10s}  {vision}  {note}",
                    flush=True,
                )
                summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"summary: {summary_path}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
