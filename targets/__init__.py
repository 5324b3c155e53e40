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

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.target)


def _host_triple() -> str:
    return {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(platform.machine(), platform.machine())


PRESETS: dict[str, TargetPreset] = {
    "host": TargetPreset(
        name="host",
        # num-cores is read by TVM's CPU runtime at load time; the library is
        # compiled for the build machine's own CPU features.
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
