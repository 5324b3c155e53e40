"""TVM's web runtime, built from the installed apache-tvm wheel's own sources.

A ``--target webgpu`` build is a tar of wasm32 objects; a page (or Node) runs it
as one ``.wasm`` linked with TVM's C++ runtime compiled to wasm, driven by
*tvmjs* (TVM's JavaScript runtime: the VM, WebGPU device, tensor-cache loader).
No registry carries either half for TVM 0.27, but the wheel ships their
sources (``tvm/web``, ``tvm/src/runtime``, tvm-ffi's ``src`` and headers); the
few headers it leaves out are ours (``include/``, ``src/support/``,
``3rdparty/compiler-rt/`` here).  :mod:`.build` compiles them with emscripten
(set-up: ``scripts/setup_emulators.sh web-runtime``) into a directory that holds

* ``wasm_runtime.o``, ``tvmjs_support.o``, ``webgpu_runtime.o``: the C++ runtime
  as wasm objects (TVM's own ``make`` writes LLVM bitcode ``.bc`` files of the
  same names; a directory of those is accepted too);
* ``tvmjs/tvmjs.bundle.js``: tvmjs (UMD: a ``<script>`` or Node ``require``);
* ``stamp.json``: the wheel versions, the emcc version and our sources' hash.

:func:`runtime_dir` is where it is looked for; :func:`why_unavailable` says what
is missing, or ``None``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

ENV = "QWEN35_WEB_RUNTIME"
ROOT = Path(__file__).resolve().parents[2]  # the repository root (= package qwen35_mobile)
DEFAULT_DIR = ROOT / ".emulators" / "web-runtime"
SOURCES = Path(__file__).resolve().parent
#: The C++ runtime's three parts, linked into every model .wasm (tvm.support.emcc order).
PARTS = ("wasm_runtime", "tvmjs_support", "webgpu_runtime")
TVMJS_BUNDLE = Path("tvmjs") / "tvmjs.bundle.js"
SETUP = "scripts/setup_emulators.sh web-runtime"


def runtime_dir() -> Path:
    """``$QWEN35_WEB_RUNTIME``, else ``.emulators/web-runtime`` of this checkout."""
    return Path(os.environ[ENV]) if os.environ.get(ENV) else DEFAULT_DIR


def runtime_objects(directory: Path | str | None = None) -> list[Path] | None:
    """The three runtime parts in ``directory`` (``.o`` ours, ``.bc`` TVM's), or None."""
    directory = Path(directory) if directory is not None else runtime_dir()
    for suffix in (".o", ".bc"):
        files = [directory / f"{part}{suffix}" for part in PARTS]
        if all(path.is_file() for path in files):
            return files
    return None


def tvmjs_bundle(directory: Path | str | None = None) -> Path | None:
    """tvmjs built beside the runtime, or None."""
    path = (Path(directory) if directory is not None else runtime_dir()) / TVMJS_BUNDLE
    return path if path.is_file() else None


def stamp(directory: Path | str | None = None) -> dict:
    """What the runtime in ``directory`` was built from ({} when unknown)."""
    path = (Path(directory) if directory is not None else runtime_dir()) / "stamp.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def why_unavailable(directory: Path | str | None = None, emcc: str = "emcc") -> str | None:
    """None when a model .wasm can be linked and run here, else what is missing."""
    directory = Path(directory) if directory is not None else runtime_dir()
    if runtime_objects(directory) is None:
        return (
            f"TVM's web runtime is not built in {directory} (run `{SETUP}`: it compiles the "
            "apache-tvm wheel's own tvm/web sources with emscripten)"
        )
    if tvmjs_bundle(directory) is None:
        return f"tvmjs ({directory / TVMJS_BUNDLE}) is not built (run `{SETUP}`)"
    if shutil.which(emcc) is None:
        return "emcc (emscripten) is not on PATH (Debian: apt-get install emscripten)"
    return None
