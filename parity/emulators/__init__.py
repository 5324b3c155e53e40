"""Parity on emulated devices: ``qwen35-mobile parity ARTIFACT --emulator NAME``.

An emulator is data (like a target preset): which shipping targets it stands
for, and which of three checks it runs:

* ``whole_model``: a preset whose library runs the whole model here (on
  PoCL, under qemu) and is compared with transformers through the bindings;
* ``kernels``: every device kernel of a shipping preset, replayed on the
  emulated device with the tensors a host twin (compile/twin.py) saw in a
  real run, and compared with the twin kernel by kernel;
* ``syntax``: the device source compiled by a syntax checker; reported as a
  syntax check, never as parity (nothing executes Metal on Linux).

parity/emulators/run.py drives them; one module per emulator holds what is
specific to it (aarch64.py, opencl.py, webgpu.py).

Availability has two outcomes that are never confused: an emulator (or a
check's tool) that is *not installed* -- a missing binary, package or file --
is a reason string (``available()`` returns it; tests skip with it, or fail
under ``CI=true``); one that is installed but *does not work* -- our Dawn
launcher exits or prints a traceback, the OpenCL add-on loads but registers
nothing, qemu cannot start the sysroot's Python -- raises :class:`BrokenTool`,
which always fails.
"""

from __future__ import annotations

import dataclasses

from ...errors import BrokenTool, UserError  # noqa: F401 (BrokenTool: re-exported)


@dataclasses.dataclass(frozen=True)
class Emulator:
    name: str
    stands_for: tuple[str, ...]  # shipping target presets whose code it checks
    description: str
    whole_model: str | None = None  # preset of the library run end to end here
    kernels: str | None = None  # preset whose device kernels are replayed one by one
    kernel_host: str | None = (
        None  # preset those kernels are compiled with to launch them here (default: kernels)
    )
    twin: str | None = None  # host-twin preset the replayed kernels are compared with
    syntax: str | None = None  # preset whose device source is only syntax-checked
    dtypes: tuple[str, ...] = ("float32", "float16")  # model dtypes it can run
    why_not_dtypes: str = ""


EMULATORS: dict[str, Emulator] = {
    "aarch64": Emulator(
        "aarch64",
        ("android", "ios"),
        "the whole model compiled for aarch64 (NEON; +fullfp16 in fp16 builds), run under qemu-user in a "
        "Debian arm64 Python with the aarch64 TVM wheels, through the project's bindings; and every kernel "
        "call of a host run replayed with the aarch64 library",
        whole_model="aarch64",
        kernels="aarch64",
        twin="host",
    ),
    "opencl": Emulator(
        "opencl",
        ("android",),
        "Android's OpenCL kernels on PoCL: the whole model through the project's OpenCL runtime add-on, "
        "and every kernel replayed against the host twin",
        whole_model="android-pocl",
        kernels="android",
        kernel_host="android-pocl",
        twin="android-twin",
        dtypes=("float32",),
        why_not_dtypes="PoCL has no cl_khr_fp16, so fp16 OpenCL kernels cannot build here; "
        "the fp16 kernels of the GPU graph are checked by the webgpu emulator",
    ),
    "webgpu": Emulator(
        "webgpu",
        ("webgpu",),
        "the whole model.wasm run by tvmjs (TVM's web runtime: VM, paged KV cache, RNN state, tensor-cache "
        "loader) in Node on Dawn (npm webgpu) over Mesa lavapipe (software Vulkan, shader-f16), and every "
        "WGSL kernel replayed there with the tensors of a host-twin run",
        whole_model="webgpu",
        kernels="webgpu",
        twin="webgpu-twin",
    ),
    "metal": Emulator(
        "metal",
        ("ios",),
        "a syntax check of every Metal kernel (clang with a stub metal_stdlib); nothing executes Metal on Linux, "
        "so this is not parity",
        syntax="ios",
    ),
}


def get_emulator(name: str) -> Emulator:
    try:
        return EMULATORS[name]
    except KeyError:
        raise UserError(
            f"unknown emulator '{name}'; known emulators: {', '.join(EMULATORS)}"
        ) from None
