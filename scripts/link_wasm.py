#!/usr/bin/env python3
"""Link a webgpu build's model.tar into a .wasm with TVM's web runtime.

    .venv/bin/python scripts/link_wasm.py ARTIFACT_DIR [-o model.wasm] [--web-runtime DIR]

Needs TVM's web runtime (wasm_runtime.bc, tvmjs_support.bc, webgpu_runtime.bc,
built from an apache/tvm 0.27 checkout: no registry carries it) and emcc; says
exactly what is missing otherwise (exit status 2).
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
        "--web-runtime", type=Path, default=None, help="directory with TVM's web runtime .bc files"
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
    except (UserError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
