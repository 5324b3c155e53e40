"""``compile --dump-ir DIR``: the IR after each pipeline stage, for anyone
debugging a kernel (as MLC's pipeline dumps its stages).

``DIR/000-export.py`` is the Relax module the model exported; then one file
per stage of the build (the passes of the two outer levels of each pipeline TVM runs:
the target's Relax pipeline, then TIR lowering), numbered in the order they
ran: ``DIR/NNN-<pass name>.py``, TVMScript.
"""

from __future__ import annotations

import re
from pathlib import Path

import tvm


def write_ir(directory: Path, index: int, stage: str, mod: tvm.IRModule) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{index:03d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', stage)}.py"
    path.write_text(mod.script(show_meta=False) if hasattr(mod, "script") else str(mod))
    return path


@tvm.instrument.pass_instrument
class DumpStages:
    """Writes the module after every pass of the two outer levels: the stages
    of a pipeline and the passes directly inside each stage (our Relax
    pipelines are one stage of several passes), not after deeper ones."""

    def __init__(self, directory: Path, start: int = 1):
        self.directory = Path(directory)
        self.count = start
        self.depth = 0

    def run_before_pass(self, mod, info):
        self.depth += 1

    def run_after_pass(self, mod, info):
        self.depth -= 1
        if 1 <= self.depth <= 2:
            write_ir(self.directory, self.count, info.name, mod)
            self.count += 1
