"""Link a WebGPU build (``model.tar`` of wasm32 objects) into a ``.wasm`` for a web page.

A page (or Node) loads one ``.wasm`` holding the model's objects *and* TVM's C++
runtime compiled to wasm (the VM, the paged KV cache and RNN state, the tensor
cache, the WebGPU device glue), and drives it with tvmjs.  The runtime is built
from the installed apache-tvm wheel's own sources by ``scripts/setup_emulators.sh
web-runtime`` (:mod:`qwen35_mobile.bindings.web_runtime`); a directory of TVM's own
``make``-built ``wasm_runtime.bc``, ``tvmjs_support.bc``, ``webgpu_runtime.bc``
(``--web-runtime DIR`` or ``$TVM_HOME/web/dist/wasm``) works too.

:func:`link_wasm` links with the flags of ``tvm.support.emcc.create_tvmjs_wasm`` and
writes the ``.wasm`` atomically; when the runtime or ``emcc`` is missing it raises
a :class:`UserError` that says how to get it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from ..bindings import web_runtime
from ..errors import UserError

#: The flags of tvm.support.emcc.create_tvmjs_wasm (what MLC's model libraries use),
#: but -O2: wasm-opt -O3 took 52 s for the tiny model on 2 cores for a .wasm 2% smaller
#: than -O2's 19 s (-O1 skips wasm-opt: 0.7 s, 55% larger); see docs/web.md.
LINK_FLAGS = (
    "-O2",
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
)


def web_runtime_candidates(runtime_dir: Path | str | None = None) -> list[Path]:
    """Where the web runtime is looked for, in order."""
    dirs = []
    if runtime_dir is not None:
        dirs.append(Path(runtime_dir))
    dirs.append(web_runtime.runtime_dir())
    if os.environ.get("TVM_HOME"):
        home = Path(os.environ["TVM_HOME"])
        dirs += [home / "web" / "dist" / "wasm", home / "web" / "dist"]
    return dirs


def find_web_runtime(runtime_dir: Path | str | None = None) -> list[Path] | None:
    """The runtime's three parts (first directory that has all), or None."""
    for directory in web_runtime_candidates(runtime_dir):
        files = web_runtime.runtime_objects(directory)
        if files is not None:
            return files
    return None


def check_web_runtime(runtime_dir: Path | str | None = None, emcc: str = "emcc") -> list[Path]:
    """The runtime's parts; UserError explaining what is missing otherwise."""
    files = find_web_runtime(runtime_dir)
    if files is None:
        searched = ", ".join(str(d) for d in web_runtime_candidates(runtime_dir))
        raise UserError(
            "cannot link a .wasm: TVM's web runtime (wasm_runtime, tvmjs_support, webgpu_runtime "
            f".o or .bc) was not found (searched {searched}); build it from the installed wheel "
            f"with `{web_runtime.SETUP}` (needs emscripten and npm). The model.tar itself is "
            "complete: an app build that has the runtime can link it instead."
        )
    if shutil.which(emcc) is None:
        raise UserError(
            f"cannot link a .wasm: '{emcc}' (emscripten) is not on PATH; install emscripten "
            "(Debian: apt-get install emscripten)"
        )
    return files


def link_wasm(
    model_tar: Path | str,
    out: Path | str,
    runtime_dir: Path | str | None = None,
    emcc: str = "emcc",
) -> Path:
    """Link ``model_tar`` (a webgpu build) with TVM's web runtime into ``out`` (.wasm)."""
    from ..bindings.web_runtime.build import emcc_env

    files = check_web_runtime(runtime_dir, emcc)
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(model_tar) as tar:
            tar.extractall(tmp, filter="data")
        objects = sorted(str(p) for p in Path(tmp).iterdir() if p.suffix == ".o")
        if not objects:
            raise UserError(f"{model_tar}: no wasm objects in it (not a webgpu build?)")
        # emcc picks the output kind by the name's suffix: the temporary name ends in .wasm.
        partial = Path(tmp) / "model.wasm"
        cmd = [emcc, *LINK_FLAGS, "-o", str(partial), *(str(f) for f in files), *objects]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=emcc_env())
        if proc.returncode != 0 or not partial.is_file():
            raise UserError(f"emcc failed linking {out}:\n{proc.stdout}{proc.stderr}"[-6000:])
        out.parent.mkdir(parents=True, exist_ok=True)
        staged = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.copyfile(partial, staged)
        os.replace(staged, out)
    return out
