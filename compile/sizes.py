"""Artifact weight sizes per model preset and quantization, computed from the
exported parameter list (no weights needed)."""

from __future__ import annotations

import math

from ..targets import get_target
from .config import PRESETS
from .pipeline import QUANTIZATIONS, model_dtype

_ITEMSIZE = {"float32": 4, "float16": 2, "uint32": 4}


def weight_bytes(preset: str, quant: str) -> tuple[int, int]:
    """(bytes of the tensor cache, text parameters of the model)."""
    from . import quantization
    from .model.qwen35 import Qwen35LM

    config = PRESETS[preset]
    model = Qwen35LM(config, model_dtype(quant), get_target("host").tvm_target())
    if quant in quantization.FORMATS:
        model = quantization.quantize_model(model, quant)
    nbytes = sum(math.prod(int(d) for d in p.shape) * _ITEMSIZE[p.dtype] for _, p in model.named_parameters())
    return nbytes, config.num_params()


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
