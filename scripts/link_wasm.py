#!/usr/bin/env python3
"""Link a webgpu build's model.tar into a .wasm with TVM's web runtime.

    .venv/bin/python scripts/link_wasm.py ARTIFACT_DIR [-o model.wasm] [--web-runtime DIR]

`qwen35-mobile compile --target webgpu` already writes ARTIFACT/model.wasm when TVM's
web runtime is built here; this links one later (or with another runtime).  Needs
the runtime (`scripts/setup_emulators.sh web-runtime` builds it from the apache-tvm
wheel's own sources into .emulators/web-runtime; --web-runtime DIR takes TVM's own
web/dist/wasm) and emcc; says exactly what is missing otherwise (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path, help="artifact directory of a --target webgpu build")
    parser.add_argument(
        "-o", "--out", type=Path, default=None, help="output .wasm (default ARTIFACT/model.wasm)"
    )
    parser.add_argument(
        "--web-runtime",
        type=Path,
        default=None,
        help="directory with TVM's web runtime (wasm_runtime, tvmjs_support, webgpu_runtime .o or .bc)",
    )
    args = parser.parse_args(argv)

    from qwen35_mobile.compile.wasm import link_wasm
    from qwen35_mobile.errors import UserError

    try:
        manifest = json.loads((args.artifact / "manifest.json").read_text())
        if manifest.get("target") != "webgpu":
            raise UserError(
                f"{args.artifact}: built for target '{manifest.get('target')}', not webgpu"
            )
        out = link_wasm(
            args.artifact / manifest["library"],
            args.out or args.artifact / "model.wasm",
            args.web_runtime,
        )
        if out.resolve().parent == args.artifact.resolve():
            # Inside the artifact: list it in the manifest, as the compile would have.
            from qwen35_mobile.compile.artifact import MANIFEST, sha256_file

            manifest["wasm"] = out.name
            manifest["wasm_bytes"] = out.stat().st_size
            manifest["files"][out.name] = {"sha256": sha256_file(out), "bytes": out.stat().st_size}
            staged = args.artifact / f".{MANIFEST}.tmp"
            staged.write_text(json.dumps(manifest, indent=2) + "\n")
            staged.replace(args.artifact / MANIFEST)
    except (UserError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
