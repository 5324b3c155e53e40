"""Shared fixtures: tiny random checkpoints and their compiled artifacts, built
once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(preset, **write_checkpoint options) -> directory."""
    from qwen35_mobile.compile.checkpoint import write_checkpoint
    from qwen35_mobile.compile.config import preset

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
    """artifact(preset, quant) -> compiled host artifact of that preset's checkpoint."""
    from qwen35_mobile.compile.compiler import compile_model

    root = tmp_path_factory.mktemp("artifacts")
    made: dict[tuple, Path] = {}

    def make(name: str = "tiny", quant: str = "q0f32", **options) -> Path:
        key = (name, quant, tuple(sorted(options.items())))
        if key not in made:
            out = root / f"{name}-{quant}-{len(made)}"
            compile_model(str(checkpoint(name)), "host", quant, out, progress=lambda _: None, **options)
            made[key] = out
        return made[key]

    return make
