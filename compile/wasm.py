"""Link a WebGPU build (``model.tar`` of wasm32 objects) into a ``.wasm`` for a web page.

The compile step needs nothing beyond the apache-tvm wheel.  Linking a ``.wasm``
that a page can load needs TVM's *web runtime*, which no package registry
carries:

* ``wasm_runtime.bc``, ``tvmjs_support.bc``, ``webgpu_runtime.bc``: the TVM C++
  runtime compiled to wasm, produced by ``make`` in ``web/`` of an apache/tvm
  source checkout of the same version as the compiler (0.27), with emscripten;
  they land in ``web/dist/wasm/``.  The PyPI wheel ships ``tvm/web`` without
  its 3rdparty headers and without these files; npm's ``@mlc-ai/web-runtime``
  is only the JavaScript half (tvmjs), which the page also needs.
* ``emcc`` (emscripten) to link them with the model's objects.

:func:`link_wasm` finds both (``--web-runtime DIR``, else ``$TVM_HOME/web/dist/wasm``)
and, when one is missing, raises a :class:`UserError` that says exactly this.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from ..errors import UserError

WEB_RUNTIME_FILES = ("wasm_runtime.bc", "tvmjs_support.bc", "webgpu_runtime.bc")

_HOW = (
    "TVM's web runtime is not on any package registry: build it from an apache/tvm 0.27 source "
    "checkout (`cd web && make`, needs emscripten) and pass its web/dist/wasm directory with "
    "--web-runtime DIR (or set TVM_HOME to the checkout); the page also needs tvmjs (the JavaScript "
    "half, npm @mlc-ai/web-runtime or the checkout's web/dist/tvmjs.bundle.js)"
)


def web_runtime_candidates(runtime_dir: Path | str | None = None) -> list[Path]:
    """Where the web runtime is looked for, in order."""
    dirs = []
    if runtime_dir is not None:
        dirs.append(Path(runtime_dir))
    if os.environ.get("TVM_HOME"):
        home = Path(os.environ["TVM_HOME"])
        dirs += [home / "web" / "dist" / "wasm", home / "web" / "dist"]
    return dirs


def find_web_runtime(runtime_dir: Path | str | None = None) -> dict[str, Path] | None:
    """The web runtime's files, or None when some are missing everywhere."""
    for directory in web_runtime_candidates(runtime_dir):
        files = {name: directory / name for name in WEB_RUNTIME_FILES}
        if all(path.is_file() for path in files.values()):
            return files
    return None


def check_web_runtime(runtime_dir: Path | str | None = None, emcc: str = "emcc") -> dict[str, Path]:
    """The web runtime's files; UserError explaining what is missing otherwise."""
    files = find_web_runtime(runtime_dir)
    if files is None:
        searched = (
            ", ".join(str(d) for d in web_runtime_candidates(runtime_dir))
            or "nowhere (no --web-runtime, no TVM_HOME)"
        )
        raise UserError(
            f"cannot link a .wasm: TVM's web runtime ({', '.join(WEB_RUNTIME_FILES)}) was not found "
            f"(searched {searched}). {_HOW}. The model.tar itself is complete: an app build that has "
            "the runtime can link it instead."
        )
    if shutil.which(emcc) is None:
        raise UserError(
            f"cannot link a .wasm: '{emcc}' (emscripten) is not on PATH; install emscripten "
            "(Debian: apt-get install emscripten; it needs NODE_PATH=/usr/share/nodejs and a writable EM_CACHE)"
        )
    return files


def link_wasm(
    model_tar: Path | str,
    out: Path | str,
    runtime_dir: Path | str | None = None,
    emcc: str = "emcc",
) -> Path:
    """Link ``model_tar`` (a webgpu build) with TVM's web runtime into ``out`` (.wasm)."""
    files = check_web_runtime(runtime_dir, emcc)
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(model_tar) as tar:
            tar.extractall(tmp, filter="data")
        objects = sorted(str(p) for p in Path(tmp).iterdir() if p.suffix == ".o")
        # The flags of tvm.support.emcc.create_tvmjs_wasm.
        cmd = [
            emcc,
            "-O3",
            "-std=c++17",
            "--no-entry",
            "-s",
            "WASM_BIGINT=1",
            "-s",
            "ERROR_ON_UNDEFINED_SYMBOLS=0",
            "-s",
            "STANDALONE_WASM=1",
            "-s",
            "ALLOW_MEMORY_GROWTH=1",
            "-s",
            "TOTAL_MEMORY=160MB",
            "-o",
            str(out),
            *(str(files[name]) for name in WEB_RUNTIME_FILES),
            *objects,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise UserError(f"emcc failed linking {out}:\n{proc.stdout}{proc.stderr}")
    return out
