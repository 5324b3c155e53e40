"""Artifact weight sizes per model preset and quantization, computed from the
exported parameter list (no weights needed): the text decoder, and the vision
tower beside it (a build with ``--no-vision`` leaves the tower out)."""

from __future__ import annotations

import math

import numpy as np

from . import pipeline
from .config import PRESETS
from .quantization import QUANTIZATIONS


def _nbytes(params) -> int:
    return sum(math.prod(shape) * np.dtype(dtype).itemsize for _, shape, dtype in params)


def weight_bytes(preset: str, quant: str) -> tuple[int, int, int]:
    """(bytes of the whole tensor cache, of the vision tower's part of it, text
    parameters of the model)."""
    config = PRESETS[preset]
    exported = pipeline.parameters(config, quant)
    tower = exported.entry_points.get(pipeline.VISION)
    return (
        _nbytes(exported.params),
        0 if tower is None else _nbytes(tower.params),
        (config.num_params()),
    )


def size_table(presets: list[str] | None = None) -> str:
    """A Markdown table per preset and quantization: the text decoder's GB and
    bytes per parameter, and the vision tower's GB (kept in the model dtype)."""
    presets = presets or [name for name in PRESETS if name.startswith("qwen3.5-")]
    # Weight formats only: q4f16_i8 stores q4f16_1's bytes.
    quants = [n for n, q in QUANTIZATIONS.items() if not q.int8_activations]
    lines = ["| model | params | " + " | ".join(quants) + " |", "|---|---|" + "---|" * len(quants)]
    for name in presets:
        cells = []
        for quant in quants:
            nbytes, tower, params = weight_bytes(name, quant)
            text = nbytes - tower
            cells.append(
                f"{text / 1e9:.2f} GB ({text / params:.3f} B/param) + {tower / 1e9:.2f} GB vision"
            )
        lines.append(f"| {name} | {params / 1e9:.2f}B | " + " | ".join(cells) + " |")
    return "\n".join(lines)
