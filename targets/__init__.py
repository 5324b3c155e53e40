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
    description: str = ""
    notes: tuple[str, ...] = ()  # what an app needs to consume the output (README, manifest)
    device: str = "cpu"  # the TVM device the bindings run the library on ("cpu", "opencl", ...)
    fp16_mattr: tuple[str, ...] = ()  # LLVM features added to the (host) target of fp16 builds
    emulation: bool = False  # a build for the parity emulators, not for shipping
    kernels_of: str | None = (
        None  # emulation: device kernels exactly as this preset's build makes them
    )
    graph_of: str | None = (
        None  # host twin: the GPU preset whose kernels it reproduces (compile/twin.py)
    )
    linker: str | None = (
        None  # C++ compiler that links a .so for another machine (None: TVM's default)
    )
    wasm: str | None = (
        None  # web builds: the .wasm linked next to the library when TVM's web runtime is built
    )
    webllm: bool = False  # also export what WebLLM calls (compile/model/webllm.py)

    @property
    def is_gpu(self) -> bool:
        return self.target["kind"] != "llvm"

    def resolved(self, dtype: str | None = None) -> dict[str, Any]:
        """The target dict with ``"mcpu": "native"`` replaced by this machine's
        CPU name (LLVM refuses ``native`` with the wheel's default triple), and
        for float16 builds ``fp16_mattr`` appended to the (host) target's mattr."""
        target = dict(self.target)
        if target.get("mcpu") == "native":
            from tvm.target import codegen

            target["mcpu"] = codegen.llvm_get_system_cpu()
        if dtype == "float16" and self.fp16_mattr:
            llvm = dict(target["host"]) if self.is_gpu else target
            llvm["mattr"] = [
                *llvm.get("mattr", []),
                *(a for a in self.fp16_mattr if a not in llvm.get("mattr", [])),
            ]
            if self.is_gpu:
                target["host"] = llvm
        return target

    def tvm_target(self, dtype: str | None = None):
        import tvm

        return tvm.target.Target(self.resolved(dtype))

    def kernel_target(self, dtype: str | None = None):
        """The target the kernels are exported and scheduled for: this preset's,
        or with ``kernels_of`` the shipping preset's (whose kernels it runs)."""
        return (
            get_target(self.kernels_of).tvm_target(dtype)
            if self.kernels_of
            else self.tvm_target(dtype)
        )


def _host_triple() -> str:
    return {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(
        platform.machine(), platform.machine()
    )


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


def _device(
    name: str,
    kind: str,
    host: dict[str, Any],
    *,
    threads: int,
    shared_memory: int,
    output: str,
    system_lib_prefix: str | None,
    description: str,
    notes: tuple[str, ...] = (),
    per_block_attr: bool = True,
    wasm: str | None = None,
    webllm: bool = False,
    **attrs: Any,
) -> TargetPreset:
    """A GPU preset: the device limits go into the TVM target dict (``max_num_threads``, which dlight and the hand-written
    kernels read, ``max_threads_per_block`` where the target kind knows it, and
    ``max_shared_memory_per_block``)."""
    target: dict[str, Any] = {"kind": kind, **attrs, "max_num_threads": threads}
    if per_block_attr:  # webgpu's target kind has no such option
        target["max_threads_per_block"] = threads
    target["max_shared_memory_per_block"] = shared_memory
    target["host"] = host
    return TargetPreset(
        name=name,
        target=target,
        host_triple=host["mtriple"],
        output=output,
        system_lib_prefix=system_lib_prefix,
        description=description,
        notes=notes,
        device=kind,
        wasm=wasm,
        webllm=webllm,
    )


# Base of the system-lib prefix of the static (app-linked) libraries; a build's
# prefix adds the model and quantization (compile/compiler.py: qwen35_0_8b_q4f16_1_),
# and the app opens it with ``SystemLib("<prefix>")``.
SYSTEM_LIB_PREFIX = "qwen35_"

PRESETS.update(
    {
        "android": _device(
            "android",
            "opencl",
            {"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon"]},
            # Adreno 6xx/7xx and Mali-G7x allow 256+ work items and 32 KB of local
            # memory; 256 / 16 KB keeps every phone driver of the last years happy.
            threads=256,
            shared_memory=16384,
            output="model.tar",
            system_lib_prefix=SYSTEM_LIB_PREFIX,
            description="Android phones: OpenCL GPU kernels, aarch64 host code, static system-lib .tar",
            notes=(
                "model.tar holds aarch64 ELF objects (lib0.o: host code, <prefix>devc.o: OpenCL C source) "
                "built with the manifest's system_lib_prefix (qwen35_<model>_<quant>_); link them with the NDK (aarch64-linux-android) "
                "into the app's JNI library together with the TVM runtime built with OpenCL",
            ),
        ),
        "ios": _device(
            "ios",
            "metal",
            {"kind": "llvm", "mtriple": "arm64-apple-darwin", "mattr": ["+neon"]},
            threads=256,
            shared_memory=32768,
            output="model.tar",
            system_lib_prefix=SYSTEM_LIB_PREFIX,
            description="iPhone/iPad: Metal GPU kernels, arm64 Apple host code, static system-lib .tar",
            notes=(
                "model.tar holds arm64 Mach-O objects (lib0.o: host code, <prefix>devc.o: Metal source) "
                "built with the manifest's system_lib_prefix (qwen35_<model>_<quant>_); add them (e.g. as a static library made with "
                "`libtool -static`) to the Xcode target next to the TVM runtime built with Metal",
            ),
        ),
        "webgpu": _device(
            "webgpu",
            "webgpu",
            {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"},
            # 256 invocations per workgroup (WebGPU's guaranteed default) and 32 KB
            # of workgroup storage: TVM's web runtime requests 32 KB from the
            # adapter and refuses to start below it (tvm/web/src/webgpu.ts), and
            # TVM's paged-attention prefill for head_dim 256 needs 16.1 KB in fp16.
            threads=256,
            shared_memory=32768,
            per_block_attr=False,
            output="model.tar",
            # tvmjs's ``instance.systemLib()`` opens the system library without a
            # prefix (``ffi.SystemLib()``), so the web build registers its
            # functions unprefixed: one model per .wasm.
            system_lib_prefix="",
            wasm="model.wasm",
            webllm=True,  # WebLLM's ABI and sampler next to ours, so that a WebLLM app loads the build
            description="browsers: WGSL kernels, wasm32 host code, .tar of wasm objects + linked model.wasm",
            notes=(
                "model.tar holds wasm32 objects (lib0.o: host code, devc.o: WGSL source), no system-lib prefix; "
                "model.wasm is them linked with TVM's web runtime (built from the apache-tvm wheel by "
                "`scripts/setup_emulators.sh web-runtime`; written when that runtime is built, else "
                "scripts/link_wasm.py links it later); a page loads model.wasm with tvmjs "
                "(.emulators/web-runtime/tvmjs/tvmjs.bundle.js) or WebLLM",
            ),
        ),
        "cuda": _device(
            "cuda",
            "cuda",
            {"kind": "llvm", "mtriple": "x86_64-linux-gnu"},
            threads=1024,
            shared_memory=49152,
            output="model.so",
            system_lib_prefix=None,
            description="NVIDIA GPUs (Hopper, sm_90) on x86_64 Linux: CUDA kernels, shared library",
            arch="sm_90",
        ),
    }
)


# Emulation presets: the same device code as a shipping preset, with host code
# this machine (or qemu) can run, for `qwen35-mobile parity --emulator`.
PRESETS.update(
    {
        "android-pocl": dataclasses.replace(
            PRESETS["android"],
            name="android-pocl",
            target={
                **PRESETS["android"].target,
                "host": {"kind": "llvm", "mtriple": _host_triple()},
            },
            host_triple=_host_triple(),
            output="model.so",
            system_lib_prefix=None,
            device="opencl",
            # TVM picks attention-kernel configurations by the host (an Android
            # host gets Adreno's); the emulator must run the android kernels.
            kernels_of="android",
            emulation=True,
            description="emulation: android's OpenCL kernels with host code for this machine, run on PoCL",
            notes=(),
        ),
        "aarch64": TargetPreset(
            name="aarch64",
            # The Android/iOS CPU code path: NEON always, half-precision
            # arithmetic and int8 dot products (ARMv8.2 fullfp16 + dotprod, every phone SoC
            # since 2018: Cortex-A55/A75 and later, Apple A11 and later) in fp16 builds.
            target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
            host_triple="aarch64-linux-gnu",
            output="model.so",
            fp16_mattr=("+fullfp16", "+dotprod"),
            linker="aarch64-linux-gnu-g++",  # Debian's g++-aarch64-linux-gnu
            emulation=True,
            description="emulation: the model on an aarch64 CPU (NEON), Linux shared library, run under qemu-user",
        ),
    }
)

# Host twins (compile/twin.py): the kernels of a GPU preset, compiled for this
# CPU, that the kernel-by-kernel emulators compare the device kernels with.
for _gpu in ("android", "webgpu"):
    PRESETS[f"{_gpu}-twin"] = TargetPreset(
        name=f"{_gpu}-twin",
        target={"kind": "llvm"},
        host_triple=_host_triple(),
        output="model.so",
        emulation=True,
        graph_of=_gpu,
        description=f"emulation: the kernels of the {_gpu} build on this CPU (parity reference per kernel)",
    )


def get_target(name: str) -> TargetPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown target '{name}'; known targets: {', '.join(PRESETS)}") from None
