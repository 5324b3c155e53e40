"""Shared fixtures: tiny random checkpoints and their compiled artifacts, built
once per test session; and :func:`need`, the one way a test says that a tool
it needs is not installed.

Strict CI: under ``CI=true`` (CI sets it) nothing the set-up installs may be
missing, so :func:`need` fails the test with the reason instead of skipping;
outside CI it skips, saying why (``pytest -rs``).  Every emulator, static-check
tool (clang, llvm-nm, PoCL/pyopencl, the aarch64 cross binutils) and Python
package the set-up installs (torch, transformers, pyopencl) goes through it.
An installed tool that does not work (``BrokenTool``: our Dawn launcher
crashed, the OpenCL add-on registered nothing...) is never a skip: the
availability functions raise it and the test fails, CI or not.

The one skip CI allows is not about a missing tool: a test that makes no sense
on the machine it runs on (test_host_refuses_the_aarch64_library on an aarch64
host).  The cuda build needs no nvcc (TVM embeds the CUDA C source), so it
always runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# scripts/test.sh runs the suite in pytest-xdist workers (one per core): each
# worker's TVM thread pool gets its share of the cores, as oversubscribed pools
# spin against each other (bindings/engine.py would otherwise give each all of them).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("TVM_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

#: True under CI (``CI=true``): a missing tool fails the test instead of skipping it.
CI = os.environ.get("CI", "").strip().lower() in ("true", "1")


def need(reason: str | None, what: str) -> None:
    """Nothing when ``reason`` is None; else ``what`` (an emulator, a tool) is
    not installed, for ``reason``: fail under CI=true, skip otherwise."""
    if not reason:
        return
    if CI:
        pytest.fail(f"{what} is not installed, and CI=true requires it: {reason}", pytrace=False)
    pytest.skip(f"{what} is not installed: {reason}")


def need_tool(check, what: str):
    """``check()``'s result; a :class:`CheckUnavailable` it raises (its tool is
    not installed) goes through :func:`need`.  Anything else it raises
    (``BrokenTool``, a failing check) propagates: the test fails."""
    from qwen35_mobile.parity.static_checks import CheckUnavailable

    try:
        return check()
    except CheckUnavailable as err:
        need(str(err), what)


def need_module(name: str, what: str | None = None):
    """``pytest.importorskip`` that fails under CI=true: the module, or
    :func:`need` when it (or a package above it) is not installed.  An import
    that fails otherwise (the module is there and raises) is an error."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is None or not (name == err.name or name.startswith(err.name + ".")):
            raise
        need(
            f"no module named '{err.name}' (scripts/setup.sh installs it)",
            what or f"the Python package {name}",
        )


def _shared_root(tmp_path_factory, name: str) -> Path:
    """A folder every worker of this test session sees (pytest-xdist: the parent of the
    workers' temporary roots), so that a checkpoint or artifact is made once per session."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    root.mkdir(exist_ok=True)
    return root


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on ``path`` (another worker making the same thing waits)."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _key_name(label: str, *parts) -> str:
    """``label`` and a digest of ``parts``: a folder name for one set of options."""
    import hashlib

    return f"{label}-{hashlib.sha256(repr(parts).encode()).hexdigest()[:8]}"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(preset, **write_checkpoint options) -> directory (made once per session)."""
    from qwen35_mobile.compile.config import preset
    from qwen35_mobile.parity.checkpoint import write_checkpoint

    root = _shared_root(tmp_path_factory, "checkpoints")

    def make(name: str = "tiny", **options) -> Path:
        out = root / _key_name(name, tuple(sorted(options.items())))
        with _locked(out.with_suffix(".lock")):
            done = out.with_suffix(".done")
            if not done.exists():
                if out.exists():  # a worker stopped half-way
                    import shutil

                    shutil.rmtree(out)
                write_checkpoint(preset(name), out, **options)
                done.touch()
        return out

    return make


@pytest.fixture(scope="session")
def artifact(tmp_path_factory, checkpoint):
    """artifact(preset, quant, target="host") -> compiled artifact of that preset's
    checkpoint (compiled once per session; compile_model writes it atomically)."""
    from qwen35_mobile.compile.compiler import compile_model

    root = _shared_root(tmp_path_factory, "artifacts")

    def make(name: str = "tiny", quant: str = "q0f32", target: str = "host", **options) -> Path:
        out = root / _key_name(f"{name}-{quant}-{target}", tuple(sorted(options.items())))
        with _locked(out.with_suffix(".lock")):
            if not out.exists():
                compile_model(
                    str(checkpoint(name)), target, quant, out, progress=lambda _: None, **options
                )
        return out

    return make


def chromium_missing(*modules: Path) -> str | None:
    """Why the headless-Chromium tests cannot run here (None: they can): Debian's chromium,
    or one of the npm ``modules`` they load (scripts/setup_emulators.sh browser)."""
    import shutil

    if shutil.which(os.environ.get("QWEN35_CHROMIUM", "chromium")) is None:
        return "chromium is not installed (scripts/setup_emulators.sh browser)"
    missing = [str(m) for m in modules if not m.exists()]
    return f"not installed: {', '.join(missing)}" if missing else None


def host_greedy(artifact: Path, ids: list[int], new_tokens: int) -> list[int]:
    """The host build's greedy tokens after the prompt ``ids`` (the browser tests' reference)."""
    import numpy as np

    from qwen35_mobile import Model

    engine = Model.load(artifact).engine
    seq = engine.add_sequence()
    logits, tokens = engine.prefill(seq, ids), []
    for step in range(new_tokens):
        tokens.append(int(np.argmax(logits)))
        if step + 1 < new_tokens:
            logits = engine.decode([seq], [tokens[-1]])[0]
    return tokens
