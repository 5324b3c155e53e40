"""Artifact weight sizes per model preset and quantization, computed from the
exported parameter list (no weights needed)."""

from __future__ import annotations

import math

import numpy as np

from . import pipeline
from .config import PRESETS
from .quantization import QUANTIZATIONS


def weight_bytes(preset: str, quant: str) -> tuple[int, int]:
    """(bytes of the tensor cache, text parameters of the model)."""
    config = PRESETS[preset]
    params = pipeline.parameters(config, quant).params
    return sum(
        math.prod(shape) * np.dtype(dtype).itemsize for _, shape, dtype in params
    ), config.num_params()


def size_table(presets: list[str] | None = None) -> str:
    """A Markdown table: GB and bytes per parameter, per preset and quantization."""
    presets = presets or [name for name in PRESETS if name.startswith("qwen3.5-")]
    quants = list(QUANTIZATIONS)
    lines = ["| model | params | " + " | ".join(quants) + " |", "|---|---|" + "---|" * len(quants)]
    for name in presets:
        cells = []
        for quant in quants:
            nbytes, params = weight_bytes(name, quant)
            cells.append(f"{nbytes / 1e9:.2f} GB ({nbytes / params:.3f} B/param)")
        lines.append(f"| {name} | {params / 1e9:.2f}B | " + " | ".join(cells) + " |")
    return "\n".join(lines)
