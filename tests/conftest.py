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

import importlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(preset, **write_checkpoint options) -> directory."""
    from qwen35_mobile.compile.config import preset
    from qwen35_mobile.parity.checkpoint import write_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    made: dict[tuple, Path] = {}

    def make(name: str = "tiny", **options) -> Path:
        key = (name, tuple(sorted(options.items())))
        if key not in made:
            out = root / f"{name}-{len(made)}"
            write_checkpoint(preset(name), out, **options)
            made[key] = out
        return made[key]

    return make


@pytest.fixture(scope="session")
def artifact(tmp_path_factory, checkpoint):
    """artifact(preset, quant, target="host") -> compiled artifact of that preset's checkpoint."""
    from qwen35_mobile.compile.compiler import compile_model

    root = tmp_path_factory.mktemp("artifacts")
    made: dict[tuple, Path] = {}

    def make(name: str = "tiny", quant: str = "q0f32", target: str = "host", **options) -> Path:
        key = (name, quant, target, tuple(sorted(options.items())))
        if key not in made:
            out = root / f"{name}-{quant}-{target}-{len(made)}"
            compile_model(
                str(checkpoint(name)), target, quant, out, progress=lambda _: None, **options
            )
            made[key] = out
        return made[key]

    return make
