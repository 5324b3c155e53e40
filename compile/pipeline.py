"""Relax model -> passes -> library, for one target preset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..targets import TargetPreset
from .config import Qwen35Config

# Quantization name -> model dtype.  q0: no quantization.  A_log and dt_bias
# stay float32 whatever the dtype (docs/design.md).
QUANTIZATIONS = {"q0f32": "float32", "q0f16": "float16"}


@dataclass
class Exported:
    mod: object  # tvm.IRModule
    params: list[tuple[str, tuple[int, ...], str]]  # name, shape, dtype, in the library's order
    functions: list[str]  # the exported entry points

    def expected(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {name: (shape, dtype) for name, shape, dtype in self.params}


def model_dtype(quant: str) -> str:
    try:
        return QUANTIZATIONS[quant]
    except KeyError:
        raise UserError(f"unknown quantization '{quant}'; known: {', '.join(QUANTIZATIONS)}") from None


def export(config: Qwen35Config, quant: str, preset: TargetPreset) -> Exported:
    """The Relax module of the text decoder, with its parameter list."""
    from .model.qwen35 import Qwen35LM

    target = preset.tvm_target()
    model = Qwen35LM(config, model_dtype(quant), target)
    spec = model.get_default_spec()
    with target:  # hand-scheduled kernels size their vector blocks for it
        mod, named = model.export_tvm(spec=spec)
    params = [(name, tuple(int(d) for d in p.shape), p.dtype) for name, p in named]
    return Exported(mod, params, list(spec.method_names))


def build(exported: Exported, preset: TargetPreset, path: Path) -> None:
    """Optimise, schedule for the target, compile and export the library."""
    import tvm

    from .schedule_cpu import cpu_pipeline

    target = preset.tvm_target()
    if preset.is_gpu:
        raise UserError(f"target '{preset.name}' has no GPU schedules yet")
    executable = tvm.compile(exported.mod, target, relax_pipeline=cpu_pipeline(target))
    executable.export_library(str(path))
