"""Device presets: a target is data, not a branch in the compiler.

Each preset names the TVM target (a JSON dict, TVM 0.27 style), the host
triple its host code is compiled for, how the library is exported, and the
limits its kernels must respect.  Adding a device means adding a preset here.
"""

from __future__ import annotations

import dataclasses
import platform
from typing import Any

from ..errors import UserError


@dataclasses.dataclass(frozen=True)
class TargetPreset:
    name: str
    target: dict[str, Any]  # the TVM target; "host" inside it for device targets
    host_triple: str
    output: str  # library file name inside the artifact
    system_lib_prefix: str | None = None  # static system-lib builds only
    max_threads_per_block: int | None = None
    max_shared_memory_per_block: int | None = None
    description: str = ""

    @property
    def is_gpu(self) -> bool:
        return self.target["kind"] != "llvm"

    def resolved(self) -> dict[str, Any]:
        """The target dict with ``"mcpu": "native"`` replaced by this machine's
        CPU name (LLVM refuses ``native`` with the wheel's default triple)."""
        if self.target.get("mcpu") != "native":
            return dict(self.target)
        from tvm.target import codegen

        return {**self.target, "mcpu": codegen.llvm_get_system_cpu()}

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.resolved())


def _host_triple() -> str:
    return {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(platform.machine(), platform.machine())


PRESETS: dict[str, TargetPreset] = {
    "host": TargetPreset(
        name="host",
        # Compiled for the build machine's own CPU ("native" is resolved to
        # its LLVM name, e.g. znver5, and recorded in the manifest).
        target={"kind": "llvm", "mcpu": "native"},
        host_triple=_host_triple(),
        output="model.so",
        description="the machine that compiles (x86_64 or aarch64 Linux), shared library",
    ),
}


def get_target(name: str) -> TargetPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown target '{name}'; known targets: {', '.join(PRESETS)}") from None
