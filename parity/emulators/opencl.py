"""The ``opencl`` emulator: Android's OpenCL kernels on PoCL.

Two checks, both fp32 (PoCL 3 has no ``cl_khr_fp16``):

* the whole model (preset ``android-pocl``: the android build's OpenCL
  kernels with host code for this machine) runs through the bindings on the
  project's OpenCL runtime add-on (bindings/opencl_runtime) and is compared
  with transformers;
* every OpenCL kernel is replayed on the tensors of a host-twin run
  (preset ``android-twin``) and compared with the twin, kernel by kernel.
"""

from __future__ import annotations

import numpy as np


def available() -> str | None:
    """None when PoCL and the add-on work here, else why not (what is not
    installed); raises :class:`~.BrokenTool` when they are installed and fail."""
    from ...bindings.opencl_runtime import why_unavailable

    return why_unavailable()


class KernelRunner:
    """Builds each kernel for ``target`` once and runs it on the OpenCL device."""

    def __init__(self, target):
        import tvm

        from ...bindings.opencl_runtime import load_opencl_runtime

        load_opencl_runtime()
        self.target, self.device, self.built = target, tvm.opencl(0), {}

    def __call__(self, name: str, func, args: list) -> list:
        import tvm

        if name not in self.built:
            mod = tvm.IRModule({name: func.with_attr("global_symbol", name)})
            self.built[name] = tvm.compile(mod, self.target)[name]
        dev_args = [
            tvm.runtime.tensor(a, self.device) if isinstance(a, np.ndarray) else a for a in args
        ]
        self.built[name](*dev_args)
        self.device.sync()
        return [a.numpy() if isinstance(a, tvm.runtime.Tensor) else None for a in dev_args]
