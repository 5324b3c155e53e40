"""The aarch64 emulator: an artifact built for the ``aarch64`` preset runs under
qemu-user in Debian's arm64 Python 3.11 with the aarch64 TVM wheels, through
this project's own bindings (``qwen35_mobile`` is a symlink to this repository
in the sysroot's site directory).  scripts/setup_emulators.d/aarch64.sh builds
the sysroot.

binfmt is not mounted on the machines this runs on, so every call names the
emulator: ``qemu-aarch64-static -L SYSROOT SYSROOT/usr/bin/python3.11 -m ...``.
One qemu process runs a whole job (importing TVM under qemu costs ~5 s, loading
the library ~1 s; see :func:`run_job`).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ...errors import UserError
from . import BrokenTool

ROOT = Path(__file__).resolve().parents[2]  # the repository (= the package qwen35_mobile)
SETUP_SCRIPT = ROOT / "scripts" / "setup_emulators.d" / "aarch64.sh"
QEMU = "qemu-aarch64-static"
WORKER = "qwen35_mobile.parity.emulators.worker"
_SITE = Path("usr/lib/python3/dist-packages")


def sysroot() -> Path:
    """The aarch64 sysroot (``$QWEN35_AARCH64_SYSROOT`` overrides the default)."""
    return Path(os.environ.get("QWEN35_AARCH64_SYSROOT") or ROOT / ".emulators" / "aarch64-sysroot")


def python() -> Path:
    return sysroot() / "usr" / "bin" / "python3.11"


_PROBED: dict[
    tuple[str, str], str | None
] = {}  # (qemu, sysroot) -> None, or why qemu cannot run its Python
_PROBE = "import platform, qwen35_mobile.parity.emulators.worker; print(platform.machine())"


def available() -> str | None:
    """None when an aarch64 library can run here, else why not: qemu, the
    sysroot's Python or one of its packages is not installed.  When all of it
    is installed and qemu still cannot run the sysroot's Python (a probe, once
    per process: starts Python, imports the project's worker) that is a broken
    emulator: :class:`BrokenTool` is raised."""
    qemu = shutil.which(QEMU)
    if qemu is None:
        return f"{QEMU} not found (Debian: apt-get install qemu-user-static; or run {SETUP_SCRIPT})"
    root = sysroot()
    if not python().exists():
        return f"no aarch64 Python in {root} (run {SETUP_SCRIPT})"
    for name in ("tvm", "tvm_ffi", "numpy", "qwen35_mobile"):
        if not (root / _SITE / name).exists():
            return f"{root} lacks the package '{name}' (run {SETUP_SCRIPT})"
    key = (qemu, str(root))
    cmd = [QEMU, "-L", str(root), str(python()), "-c", _PROBE]
    if key not in _PROBED:
        try:
            done = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
                env=_env(1, None),
                cwd=tempfile.gettempdir(),
                stdin=subprocess.DEVNULL,
            )
            ok = done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == ["aarch64"]
            _PROBED[key] = (
                None
                if ok
                else (
                    f"exit {done.returncode}: "
                    + " | ".join((done.stdout + done.stderr).strip().splitlines()[-8:])
                )
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            _PROBED[key] = f"{type(err).__name__}: {err}"
    if _PROBED[key]:
        raise BrokenTool(
            f"the aarch64 emulator is installed but does not work: {' '.join(cmd[:4])} -c '{_PROBE}' "
            f"failed ({_PROBED[key]}); rebuild the sysroot with {SETUP_SCRIPT}"
        )
    return None


def setup(*, quiet: bool = True) -> str | None:
    """Run the (idempotent) setup script; returns :func:`available`'s answer."""
    if available() is None:
        return None
    if not SETUP_SCRIPT.exists():
        return f"{SETUP_SCRIPT} is missing"
    done = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=quiet, text=True)
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-5:] if quiet else []
        return f"{SETUP_SCRIPT} failed (exit {done.returncode}): " + " | ".join(tail)
    return available()


def _env(threads: int | None, extra: dict[str, str] | None) -> dict[str, str]:
    """The environment of the emulated Python: the host's, less anything that
    would point it at the host's Python packages."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "VIRTUAL_ENV", "CONDA", "QEMU_"))
    }
    env["TVM_NUM_THREADS"] = str(
        threads or os.environ.get("TVM_NUM_THREADS") or os.cpu_count() or 1
    )
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra or {})
    return env


def command(module: str, args: list[str]) -> list[str]:
    return [QEMU, "-L", str(sysroot()), str(python()), "-m", module, *map(str, args)]


def run_in_qemu(
    module: str,
    args: list[str],
    *,
    timeout: float | None = None,
    threads: int | None = None,
    env: dict[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python3.11 -m MODULE ARGS`` under qemu-aarch64 in the sysroot.

    stdout is captured; stderr is captured too and, with ``progress``, each of
    its lines is passed on as it comes.  Raises UserError (with the tail of
    stderr) when the emulator is missing, the command fails or it runs past
    ``timeout`` seconds."""
    reason = available()
    if reason:
        raise UserError(f"the aarch64 emulator cannot run: {reason}")
    cmd = command(module, args)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_env(threads, env),
        cwd=tempfile.gettempdir(),
    )
    out: list[str] = []
    err: list[str] = []
    tail: collections.deque[str] = collections.deque(maxlen=30)

    def read_err() -> None:
        for line in proc.stderr:
            err.append(line)
            tail.append(line.rstrip("\n"))
            if progress:
                progress(line.rstrip("\n"))

    def read_out() -> None:
        out.append(proc.stdout.read())

    readers = [
        threading.Thread(target=read_err, daemon=True),
        threading.Thread(target=read_out, daemon=True),
    ]
    for r in readers:
        r.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        for r in readers:
            r.join(5)
        raise UserError(
            f"qemu-aarch64: '{module}' ran past {timeout:.0f} s and was stopped; last output:\n"
            + "\n".join(tail)
        ) from None
    for r in readers:
        r.join()
    done = subprocess.CompletedProcess(cmd, proc.returncode, "".join(out), "".join(err))
    if done.returncode != 0:
        raise UserError(
            f"qemu-aarch64: '{module}' failed (exit {done.returncode}):\n" + "\n".join(tail)
        )
    return done


def run_job(
    artifact: Path,
    encoded: list[list[int]],
    new_tokens: int,
    *,
    timeout: float | None = 1800,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    images: list[np.ndarray] | None = None,
    image_cases: list[dict] | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """Run the parity job (``parity.report.collect_ours``) on ``artifact``
    under qemu in one process (``images``: resized uint8 pixels for the vision
    tower; ``image_cases``: the end-to-end image prompts).  Returns its arrays and the worker's timings (``import_s``,
    ``load_s``, ``run_s``) plus ``wall_s`` of the whole call."""
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="qwen35-aarch64-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.npz"
        spec = {"prompts": [list(map(int, ids)) for ids in encoded], "new_tokens": int(new_tokens)}
        if images:
            np.savez(Path(tmp) / "images.npz", *images)
            spec["images"] = str(Path(tmp) / "images.npz")
            spec["image_cases"] = image_cases or []
        job.write_text(json.dumps(spec))
        done = run_in_qemu(
            WORKER,
            [str(Path(artifact).resolve()), str(job), str(out)],
            timeout=timeout,
            threads=threads,
            progress=progress,
        )
        with np.load(out) as data:
            arrays = {k: data[k] for k in data.files}
    info = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}
    info["wall_s"] = round(time.time() - t0, 2)
    return arrays, info


def ours(artifact: Path, **options) -> Callable[[list[list[int]], int], dict[str, np.ndarray]]:
    """For ``run_parity(..., ours=...)``: the compiled side computed under qemu."""

    def collect(
        encoded: list[list[int]], new_tokens: int, images=None, image_cases=None
    ) -> dict[str, np.ndarray]:
        return run_job(
            artifact, encoded, new_tokens, images=images, image_cases=image_cases, **options
        )[0]

    return collect


if (
    __name__ == "__main__"
):  # python -m qwen35_mobile.parity.emulators.aarch64: say whether it can run
    reason = available()
    print(reason or f"ready: {' '.join(command('MODULE', []))}")
    sys.exit(1 if reason else 0)


def replay(
    artifact: Path,
    calls: list,
    *,
    timeout: float | None = 1800,
    progress=None,
    override: tuple[Path, list[str]] | None = None,
) -> list:
    """Run captured kernel calls (:mod:`.capture`) with ``artifact``'s aarch64
    library under qemu, in one process; returns the calls with what it wrote.
    ``override``: (a library, kernel names) the replay takes those kernels from
    (:func:`broken_kernel_library`)."""
    from .capture import load_calls, save_calls

    with tempfile.TemporaryDirectory(prefix="qwen35-aarch64-replay-") as tmp:
        calls_path, job, out = (
            Path(tmp) / "calls.npz",
            Path(tmp) / "job.json",
            Path(tmp) / "out.npz",
        )
        save_calls(calls, calls_path)
        spec: dict = {"replay": str(calls_path)}
        if override:
            spec["override"] = {
                "library": str(Path(override[0]).resolve()),
                "kernels": list(override[1]),
            }
        job.write_text(json.dumps(spec))
        run_in_qemu(
            WORKER,
            [str(Path(artifact).resolve()), str(job), str(out)],
            timeout=timeout,
            progress=progress,
        )
        return load_calls(out)


def broken_kernel_library(mod, dtype: str, name: str, out: Path) -> Path:
    """The aarch64 build's kernel ``name`` broken on purpose
    (:func:`.replay.break_kernel`: every float store into an argument * 1.5 +
    0.25), alone in a library cross-linked like the model's: ``--break-kernel``
    for the aarch64 replay.  ``mod``: the exported Relax module of the
    ``aarch64`` preset; the kernel is taken after the same CPU pipeline the
    model library is built with."""
    import tvm
    from tvm.support import cc

    from ...compile.schedule_cpu import cpu_pipeline
    from ...targets import get_target
    from .replay import break_kernel

    preset = get_target("aarch64")
    target = preset.tvm_target(dtype)
    with target:
        lowered = cpu_pipeline(target)(mod)
    funcs = {
        gv.name_hint: f for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
    }
    if name not in funcs:
        raise UserError(f"--break-kernel: no kernel '{name}' in the aarch64 build")
    broken = break_kernel(funcs[name]).with_attr("global_symbol", name)
    lib = tvm.tirx.build(tvm.IRModule({name: broken}), target=target)
    out.parent.mkdir(parents=True, exist_ok=True)
    lib.export_library(str(out), fcompile=cc.cross_compiler(preset.linker))
    return out
