"""Build TVM's web runtime from the installed apache-tvm wheel (see ``__init__``).

    python -m qwen35_mobile.bindings.web_runtime.build [--out DIR] [--force]

Idempotent: a directory whose ``stamp.json`` matches the installed wheels, the
emcc version and our sources is left alone.  The build happens in a sibling
temporary directory that replaces ``DIR`` only when everything is built, so a
failure or a kill leaves the old runtime (or none), never half of one.

Steps (the wheel's ``tvm/web/Makefile``, with our headers and wasm objects
instead of bitcode so that linking a model does no whole-runtime LTO):

1. a source tree laid out as an apache/tvm checkout: the wheel's ``tvm/include``,
   ``tvm/src/runtime``, ``tvm/web``, tvm-ffi's ``include``/``src``/``3rdparty``
   under ``3rdparty/tvm-ffi``, plus our headers;
2. ``emcc -c`` of ``web/emcc/{wasm_runtime,tvmjs_support,webgpu_runtime}.cc``;
3. the emscripten JavaScript glue (``tvmjs_runtime.js``, linked with
   ``--pre-js emcc/preload.js -s ASYNCIFY=1`` as the Makefile does), turned into
   ``src/tvmjs_runtime_wasi.js`` by the wheel's ``emcc/decorate_as_wasi.py``;
4. tvmjs itself: ``npm ci`` of the build tools pinned in ``tvmjs/package-lock.json``
   here, then ``rollup -c`` with the wheel's config -> ``tvmjs/tvmjs.bundle.js``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import PARTS, SOURCES, TVMJS_BUNDLE, runtime_dir
from . import stamp as read_stamp

#: Flags of the wheel's web/Makefile (EMCC_CFLAGS).
CFLAGS = ["-O3", "-std=c++17", "-Wno-ignored-attributes", "-w"]
#: Link flags of the glue (EMCC_LDFLAGS).  -O1: the .wasm of this link is thrown
#: away (models link their own); only its JavaScript is kept, and -O3 with
#: ASYNCIFY costs minutes of wasm-opt for the same JavaScript API.
GLUE_LDFLAGS = [
    "-O1",
    "--no-entry",
    "-s",
    "WASM_BIGINT=1",
    "-s",
    "ALLOW_MEMORY_GROWTH=1",
    "-s",
    "STANDALONE_WASM=1",
    "-s",
    "ERROR_ON_UNDEFINED_SYMBOLS=0",
    "-s",
    "ASYNCIFY=1",
]


class BuildError(RuntimeError):
    """A step of the build failed; the message holds its output."""


def emcc_env() -> dict[str, str]:
    """Debian's emscripten runs its JavaScript tools with the system's Node modules."""
    env = dict(os.environ)
    if Path("/usr/share/nodejs").is_dir():
        env["NODE_PATH"] = os.pathsep.join(
            p for p in (env.get("NODE_PATH", ""), "/usr/share/nodejs") if p
        )
    return env


def emcc_version(emcc: str = "emcc") -> str:
    proc = subprocess.run([emcc, "--version"], capture_output=True, text=True, env=emcc_env())
    if proc.returncode != 0:
        raise BuildError(f"{emcc} --version failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout.splitlines()[0].strip()


def wheel_dirs() -> tuple[Path, Path, str]:
    """The installed tvm and tvm_ffi package directories and their versions."""
    import tvm
    import tvm_ffi

    versions = f"apache-tvm {tvm.__version__}, tvm-ffi {tvm_ffi.__version__}"
    return Path(tvm.__file__).parent, Path(tvm_ffi.__file__).parent, versions


def sources_hash() -> str:
    """Our headers, this builder and the tvmjs lock: what the build depends on here."""
    digest = hashlib.sha256()
    for path in sorted(SOURCES.rglob("*")):
        if path.is_file() and "node_modules" not in path.parts and path.suffix != ".pyc":
            digest.update(str(path.relative_to(SOURCES)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def wanted_stamp(emcc: str = "emcc") -> dict:
    _, _, versions = wheel_dirs()
    return {"wheels": versions, "emcc": emcc_version(emcc), "sources": sources_hash()}


def run(cmd: list[str], cwd: Path, what: str, env: dict | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env or emcc_env())
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise BuildError(f"{what} failed ({' '.join(cmd[:3])} ...):\n{tail}")


def stage_tree(tree: Path) -> None:
    """An apache/tvm-shaped source tree from the wheel, with our headers on top."""
    tvm_dir, ffi_dir, _ = wheel_dirs()
    ignore = shutil.ignore_patterns("__pycache__", "node_modules", "*.pyc")
    shutil.copytree(tvm_dir / "include", tree / "include", ignore=ignore)
    shutil.copytree(tvm_dir / "src", tree / "src", ignore=ignore)
    shutil.copytree(tvm_dir / "web", tree / "web", ignore=ignore)
    for name in ("include", "src", "3rdparty"):
        shutil.copytree(ffi_dir / name, tree / "3rdparty" / "tvm-ffi" / name, ignore=ignore)
    for name in ("include", "src", "3rdparty"):
        shutil.copytree(SOURCES / name, tree / name, dirs_exist_ok=True)


def include_flags(tree: Path) -> list[str]:
    ffi = tree / "3rdparty" / "tvm-ffi"
    dirs = [
        tree,
        tree / "include",
        ffi / "include",
        ffi / "3rdparty" / "dlpack" / "include",
        tree / "3rdparty" / "compiler-rt",
    ]
    return [f"-I{d}" for d in dirs]


def build(out: Path, emcc: str = "emcc", npm: str = "npm", force: bool = False) -> Path:
    """Build the runtime into ``out`` (skipped when its stamp matches)."""
    want = wanted_stamp(emcc)
    if not force and read_stamp(out) == want and (out / TVMJS_BUNDLE).is_file():
        print(f"web runtime: up to date in {out}")
        return out
    if shutil.which(npm) is None:
        raise BuildError(f"'{npm}' (Node.js) is needed to build tvmjs")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    started = time.monotonic()

    def step(text: str) -> None:
        print(f"web runtime [{time.monotonic() - started:5.0f} s] {text}", flush=True)

    try:
        tree = work / "tree"
        web = tree / "web"
        step(f"staging the sources of {want['wheels']}")
        stage_tree(tree)
        # The three compiles and npm ci are independent: run at once (wasm_runtime.cc alone
        # takes ~150 s; one after another the four took ~235 s on 2 cores).
        objects = [work / f"{part}.o" for part in PARTS]
        for name in ("package.json", "package-lock.json"):
            shutil.copy(SOURCES / "tvmjs" / name, web / name)
        npm_cmd = [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error", "--ignore-scripts"]
        jobs = [
            (
                f"emcc -c {part}.cc",
                [
                    emcc,
                    *include_flags(tree),
                    *CFLAGS,
                    "-c",
                    "-o",
                    str(obj),
                    str(web / "emcc" / f"{part}.cc"),
                ],
                None,
            )
            for part, obj in zip(PARTS, objects, strict=True)
        ]
        jobs.append(
            ("npm ci (rollup, typescript: tvmjs/package-lock.json)", npm_cmd, dict(os.environ))
        )
        step("at once: " + "; ".join(what for what, _, _ in jobs))
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            done = [pool.submit(run, cmd, web, what, env) for what, cmd, env in jobs]
            for future in done:
                future.result()  # the first failure, with its command's output
        step("linking the emscripten JavaScript glue (tvmjs_runtime.js)")
        glue_dir = work / "glue"
        glue_dir.mkdir()
        glue = glue_dir / "tvmjs_runtime.js"
        cmd = [emcc, *[str(o) for o in objects], "-o", str(glue), *GLUE_LDFLAGS]
        run([*cmd, "--pre-js", str(web / "emcc" / "preload.js")], web, "linking tvmjs_runtime.js")
        run(
            [
                sys.executable,
                str(web / "emcc" / "decorate_as_wasi.py"),
                str(glue),
                str(web / "src" / "tvmjs_runtime_wasi.js"),
                "es",
            ],
            web,
            "decorate_as_wasi.py",
        )
        step("rollup -c (tvmjs)")
        rollup = web / "node_modules" / "rollup" / "dist" / "bin" / "rollup"
        run(["node", str(rollup), "-c"], web, "rollup (tvmjs)", env=dict(os.environ))
        result = work / "result"
        (result / TVMJS_BUNDLE).parent.mkdir(parents=True)
        shutil.copy(web / "lib" / "index.js", result / TVMJS_BUNDLE)
        for obj in objects:
            shutil.copy(obj, result / obj.name)
        (result / "stamp.json").write_text(json.dumps(want, indent=2) + "\n")
        # Replace the old runtime only now that the new one is whole.
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        result.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    step(f"done: {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build TVM's web runtime (wasm objects + tvmjs) from the installed "
        "apache-tvm wheel's own sources, with emscripten and npm."
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"output directory ({runtime_dir()})"
    )
    parser.add_argument("--emcc", default="emcc", help="the emscripten compiler (default emcc)")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    try:
        build(args.out or runtime_dir(), emcc=args.emcc, force=args.force)
    except (BuildError, OSError) as err:
        print(f"web runtime: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
