"""Static checks of device builds, without the device.

* :func:`device_source` -- the device code (OpenCL C, Metal, WGSL) embedded in a
  static build's ``<prefix>devc.o`` (TVM stores it length-prefixed, starting
  with ``// Function: ``).
* :func:`check_opencl` -- build the OpenCL C with an OpenCL implementation on
  this machine (PoCL on a CPU: ``apt-get install pocl-opencl-icd
  ocl-icd-libopencl1`` and ``pip install pyopencl``).  PoCL has no
  ``cl_khr_fp16``, so only fp32 builds can be checked this way.
* :func:`wgsl_storage_buffers` -- storage buffers per WGSL kernel; TVM's web
  runtime asks the adapter for :data:`WEBGPU_MAX_STORAGE_BUFFERS` per stage.
* :func:`check_wgsl_dawn` -- every WGSL kernel creates a shader module on Dawn
  (npm ``webgpu`` over Mesa lavapipe: ``scripts/setup_emulators.d/webgpu.sh``).

A check whose tool is not installed raises :class:`CheckUnavailable` (tests
skip with its message, or fail under ``CI=true``); a tool that is installed and
does not work (pyopencl finds no platform although a driver is installed, clang
cannot compile a known-good Metal kernel against the stub) raises
:class:`~..parity.emulators.BrokenTool`, which always fails; a failing check
raises :class:`UserError` with the compiler's log.
"""

from __future__ import annotations

import functools
import re
import struct
import tarfile
from pathlib import Path

from ..errors import UserError

#: maxStorageBuffersPerShaderStage that tvmjs requests (tvm/web/src/webgpu.ts; WebGPU's default is 8).
WEBGPU_MAX_STORAGE_BUFFERS = 10

# How TVM's device sources start: OpenCL ("// Function: ..."), WebGPU ("//----"
# then "// Function: ..."), Metal ("#include <metal_stdlib>").
_STARTS = (b"// Function: ", b"//----", b"#include <metal_stdlib>")


class CheckUnavailable(Exception):
    """The tool a check needs is not installed here."""


def device_source(model_tar: Path | str) -> str:
    """The device source embedded in a static (``.tar``) device build."""
    with tarfile.open(model_tar) as tar:
        for member in tar.getmembers():
            if member.name.endswith("devc.o"):
                data = tar.extractfile(member).read()
                break
        else:
            raise UserError(f"{model_tar}: no devc.o (not a device build)")
    # Length-prefixed strings: one for OpenCL, one per kernel for Metal and WebGPU.
    found = {}
    for start_token in _STARTS:
        pos = data.find(start_token)
        while pos >= 8:
            (length,) = struct.unpack_from("<Q", data, pos - 8)
            if 0 < length <= len(data) - pos:
                found[pos] = length
            pos = data.find(start_token, pos + 1)
    parts, end = [], 0
    for pos in sorted(found):
        if pos >= end:  # not inside an earlier string
            parts.append(data[pos : pos + found[pos]].decode())
            end = pos + found[pos]
    if not parts:
        raise UserError(f"{model_tar}: no device source in devc.o")
    return "\n".join(parts)


def kernel_sources(source: str) -> dict[str, str]:
    """``{kernel: its part of source}``: split on TVM's ``// Function:`` lines
    (OpenCL, WGSL), or per ``#include <metal_stdlib>`` unit (Metal)."""
    if "// Function: " in source:
        return {
            chunk.split("\n", 1)[0].strip(): chunk for chunk in source.split("// Function: ")[1:]
        }
    units = {}
    for chunk in source.split("#include <metal_stdlib>")[1:]:
        for name in re.findall(r"kernel void (\w+)\(", chunk):
            units[name] = "#include <metal_stdlib>" + chunk
    return units


def opencl_devices():
    """``(pyopencl, devices)``: the OpenCL devices pyopencl sees.

    :class:`CheckUnavailable` when pyopencl or every OpenCL driver (ICD, e.g.
    PoCL) is not installed; :class:`BrokenTool` when a driver is installed and
    pyopencl finds no platform or no device."""
    from ..bindings.opencl_runtime import opencl_icds
    from .emulators import BrokenTool

    try:
        import pyopencl as cl
    except ModuleNotFoundError as err:
        if err.name == "pyopencl":
            raise CheckUnavailable(
                "pyopencl is not installed (scripts/setup_static_checks.sh: pip install pyopencl)"
            ) from err
        raise
    icds = opencl_icds()
    if not icds:
        raise CheckUnavailable(
            "no OpenCL driver is installed (no ICD in /etc/OpenCL/vendors or $OCL_ICD_VENDORS; "
            "Debian: pocl-opencl-icd, scripts/setup_static_checks.sh)"
        )
    try:
        devices = [d for p in cl.get_platforms() for d in p.get_devices()]
    except cl.Error as err:
        raise BrokenTool(
            f"OpenCL drivers are installed ({', '.join(map(str, icds))}) but pyopencl finds no platform: {err}"
        ) from err
    if not devices:
        raise BrokenTool(
            f"OpenCL drivers are installed ({', '.join(map(str, icds))}) but pyopencl finds no device"
        )
    return cl, devices


def check_opencl(source: str) -> str:
    """Build ``source`` (OpenCL C) on the first OpenCL device; returns a one-line report."""
    cl, devices = opencl_devices()
    if "cl_khr_fp16" in source and "cl_khr_fp16" not in devices[0].extensions:
        raise CheckUnavailable(f"{devices[0].name} has no cl_khr_fp16 (fp16 kernels)")
    ctx = cl.Context(devices[:1])
    try:
        program = cl.Program(ctx, source).build()
    except cl.Error as err:
        raise UserError(
            f"the OpenCL C does not build on {devices[0].platform.name}: {err}"
        ) from err
    return f"{len(program.all_kernels())} kernels built on {devices[0].platform.name} ({devices[0].name})"


def wgsl_storage_buffers(source: str) -> dict[str, int]:
    """Storage buffers each WGSL kernel binds."""
    return {
        name: len(re.findall(r"var<storage", part)) for name, part in kernel_sources(source).items()
    }


def check_wgsl_dawn(source_or_artifact: str | Path) -> str:
    """Create a shader module for every WGSL kernel on Dawn (npm ``webgpu`` over Mesa
    lavapipe, parity/emulators/webgpu.py); returns a one-line report.

    ``source_or_artifact``: WGSL source (TVM's ``// Function:`` sections), a webgpu
    ``model.tar`` or the artifact folder holding it.  Raises :class:`CheckUnavailable`
    without Dawn/lavapipe (scripts/setup_emulators.d/webgpu.sh installs them) and
    :class:`UserError` naming each kernel Dawn refuses, with its messages.
    """
    from .emulators import webgpu

    if isinstance(source_or_artifact, str) and "@compute" in source_or_artifact:
        source = source_or_artifact
    else:
        path = Path(source_or_artifact)
        source = device_source(path / "model.tar" if path.is_dir() else path)
    kernels = webgpu.split_wgsl(
        source
    )  # each kernel's WGSL alone (kernel_sources keeps the header line)
    if not kernels:
        raise UserError("no WGSL kernels in the source")
    why = webgpu.available()
    if why:
        raise CheckUnavailable(why)
    errors = {name: err for name, err in webgpu.check_shader_modules(kernels).items() if err}
    if errors:
        shown = "\n".join(f"{name}:\n{err}" for name, err in list(errors.items())[:5])
        raise UserError(
            f"{len(errors)} of {len(kernels)} WGSL kernels do not create a shader module on Dawn:\n{shown}"
        )
    device = webgpu.adapter_info()["adapter"].get("description") or "Dawn"
    return f"{len(kernels)} WGSL kernels created shader modules on Dawn ({device})"


# --------------------------------------------------------------------------
# Metal: clang syntax check against a stub <metal_stdlib>
# --------------------------------------------------------------------------
_VECTOR_ELEMENTS = (
    "float",
    "half",
    "int",
    "uint",
    "short",
    "ushort",
    "char",
    "uchar",
    "long",
    "ulong",
)


def metal_stdlib_stub() -> str:
    """A stand-in for Apple's ``<metal_stdlib>``: enough of Metal's language
    (address spaces, vector types and their constructors, the math and SIMD
    functions TVM emits) for clang to check the syntax and the types of TVM's
    Metal kernels as C++.  ``half`` is ``float`` here: with ``_Float16``,
    Metal's ``(float4)half4`` conversions would be size-changing vector casts,
    which clang refuses and Metal allows."""
    vectors = "\n".join(
        f"typedef {t} {t}{n} __attribute__((ext_vector_type({n})));\n#define {t}{n}(...) (({t}{n}){{__VA_ARGS__}})"
        for t in _VECTOR_ELEMENTS
        for n in (2, 3, 4)
    )
    unary = "exp exp2 log log2 sqrt rsqrt abs fabs floor ceil round trunc sin cos tan tanh sigmoid erf log1p expm1 isnan isinf sign"
    binary = "pow fmod min max fmin fmax atan2 copysign"
    return "\n".join(
        [
            "#pragma once",
            "#define kernel",
            "#define device",
            "#define threadgroup",
            "#define constant",
            "#define thread",
            "typedef float half;",
            'constexpr half operator""h(long double x) { return (half)x; }',
            'constexpr half operator""h(unsigned long long x) { return (half)x; }',
            "typedef unsigned int uint; typedef unsigned short ushort; typedef unsigned char uchar; typedef unsigned long ulong;",
            vectors,
            "namespace metal {",
            "enum class mem_flags { mem_none, mem_device, mem_threadgroup, mem_texture };",
            "inline void threadgroup_barrier(mem_flags) {}",
            "inline void simdgroup_barrier(mem_flags) {}",
            *(
                f"template <class T> T {f}(T x, ushort) {{ return x; }}"
                for f in (
                    "simd_shuffle_down",
                    "simd_shuffle_up",
                    "simd_shuffle",
                    "simd_shuffle_xor",
                )
            ),
            "template <class T> T simd_sum(T x) { return x; }",
            *(f"template <class T> T {f}(T x) {{ return x; }}" for f in unary.split()),
            *(f"template <class T, class U> T {f}(T x, U) {{ return x; }}" for f in binary.split()),
            *(
                f"template <class T, class U, class V> T {f}(T x, U, V) {{ return x; }}"
                for f in ("fma", "clamp", "select")
            ),
            "template <class T, class U> T as_type(U x) { return (T)x; }",
            "}  // namespace metal",
            "",
        ]
    )


def _clang() -> str:
    import shutil

    for name in ("clang", *(f"clang-{v}" for v in range(22, 13, -1))):
        if shutil.which(name):
            return name
    raise CheckUnavailable("no clang on PATH (Debian: apt-get install clang)")


_METAL_FLAGS = [
    "--target=aarch64-linux-gnu",
    "-x",
    "c++",
    "-std=c++17",
    "-fsyntax-only",
    "-Wno-unknown-attributes",
    "-Wno-user-defined-literals",
    "-Wno-c99-extensions",
]
#: A kernel the syntax check must pass (address spaces, attributes, vectors, half literals, math).
_METAL_PROBE = (
    "#include <metal_stdlib>\nusing namespace metal;\n"
    "kernel void probe_kernel(device float* a [[ buffer(0) ]], uint3 t [[ thread_position_in_grid ]]) {\n"
    "  float4 v = float4(a[0], a[1], a[2], a[3]);\n"
    "  a[t.x] = exp(v.x) + (float)((half)1.0h) + max(v.y, v.z);\n"
    "  threadgroup_barrier(mem_flags::mem_threadgroup);\n}\n"
)


def _syntax_errors(clang: str, units: list[str]) -> list[str | None]:
    """clang's messages per unit (None: passes), each unit its own compilation."""
    import subprocess
    import tempfile

    out: list[str | None] = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "metal_stdlib").write_text(metal_stdlib_stub())
        for i, unit in enumerate(
            units
        ):  # one unit per call: each kernel redefines TVM's helper types
            path = Path(tmp) / f"k{i}.metal"
            path.write_text(unit)
            proc = subprocess.run(
                [clang, *_METAL_FLAGS, "-I", tmp, str(path)],
                capture_output=True,
                text=True,
                check=False,
            )
            out.append(
                None
                if proc.returncode == 0
                else (proc.stderr or f"{clang} exited {proc.returncode}")
            )
    return out


@functools.cache
def _metal_probe(clang: str) -> None:
    from .emulators import BrokenTool

    (err,) = _syntax_errors(clang, [_METAL_PROBE])
    if err is not None:
        raise BrokenTool(
            f"{clang} fails a known-good Metal kernel against the stub metal_stdlib "
            f"(the check itself is broken):\n{err[:2000]}"
        )


def metal_clang() -> str:
    """The clang of the Metal syntax check, after it passed a known-good kernel:
    :class:`CheckUnavailable` without clang, ``BrokenTool`` when it fails the probe."""
    clang = _clang()
    _metal_probe(clang)
    return clang


def _metal_units(source: str) -> list[str]:
    return ["#include <metal_stdlib>" + u for u in source.split("#include <metal_stdlib>")[1:]]


def _metal_failures(source: str) -> tuple[int, list[tuple[list[str], str]]]:
    """(number of units, [(kernels of a failing unit, clang's messages)])."""
    units = _metal_units(source)
    if not units:
        raise UserError("no Metal kernels in the source")
    failing = [
        (re.findall(r"kernel void (\w+)\(", unit) or ["(a unit without a kernel)"], err)
        for unit, err in zip(units, _syntax_errors(metal_clang(), units))
        if err is not None
    ]
    return len(units), failing


def metal_syntax_errors(source: str) -> dict[str, str]:
    """``{Metal kernel: clang's messages}`` for every kernel whose unit fails the syntax check."""
    return {name: err for names, err in _metal_failures(source)[1] for name in names}


def check_metal(source: str) -> str:
    """clang syntax check of every Metal kernel (each is its own compilation unit);
    raises UserError naming each failing kernel, with the first one's messages."""
    total, failing = _metal_failures(source)
    if failing:
        names = sorted(name for names, _ in failing for name in names)
        raise UserError(
            f"{len(failing)} of {total} Metal kernels fail the clang syntax check "
            f"({', '.join(names)}):\n" + failing[0][1][:4000]
        )
    return f"{total} Metal kernels pass the clang syntax check ({metal_clang()}, stub metal_stdlib)"


def break_metal_kernel(source: str, name: str, prefix: str = "") -> tuple[str, list[str]]:
    """``source`` with the Metal kernels of ``name`` made invalid on purpose (a
    call of an undeclared function opens their body), and their names: a
    negative control of the syntax check.  ``name``: a Metal kernel, or the
    TIR function whose kernels are ``[prefix]name_kernel[_N]``."""
    kernels = re.findall(r"kernel void (\w+)\(", source)
    pattern = re.compile(rf"(?:{re.escape(prefix)})?{re.escape(name)}(?:_kernel(?:_\d+)?)?")
    chosen = [k for k in kernels if k == name] or [k for k in kernels if pattern.fullmatch(k)]
    if not chosen:
        raise UserError(
            f"--break-kernel: no Metal kernel '{name}' (nor '{prefix}{name}_kernel') in the source"
        )
    for kernel in chosen:
        start = source.index(f"kernel void {kernel}(")
        brace = source.index("{", start)
        source = source[: brace + 1] + " qwen35_broken_on_purpose();" + source[brace + 1 :]
    return source, sorted(chosen)


# --------------------------------------------------------------------------
# Objects: nothing undefined but the TVM runtime's symbols
# --------------------------------------------------------------------------
# What the app's TVM runtime provides (tvm-ffi C API, TVM backend API), what
# every C runtime provides, and the wasm linker's own symbols.
_RUNTIME_SYMBOL = re.compile(
    r"^_?(TVMFFI\w+|TVMBackend\w+|memcpy|memset|memmove|__stack_chk_\w+|"
    r"__indirect_function_table|__memory_base|__stack_pointer|__table_base)$"
)


def _llvm_nm() -> str:
    import shutil

    for name in ("llvm-nm", *(f"llvm-nm-{v}" for v in range(22, 13, -1))):
        if shutil.which(name):
            return name
    raise CheckUnavailable("no llvm-nm on PATH (Debian: apt-get install llvm)")


def undefined_symbols(model_tar: Path | str) -> set[str]:
    """Undefined symbols of the objects in a static build."""
    import subprocess
    import tempfile

    nm = _llvm_nm()
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(model_tar) as tar:
            tar.extractall(tmp, filter="data")
        objects = sorted(str(p) for p in Path(tmp).glob("*.o"))
        proc = subprocess.run([nm, "-u", *objects], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise UserError(f"{nm} failed on {model_tar}: {proc.stderr[:2000]}")
    # "   U name" (ELF, wasm) or just "name" (Mach-O); "file.o:" headers and blank lines between.
    return {
        line.split()[-1]
        for line in proc.stdout.splitlines()
        if line.strip() and not line.rstrip().endswith(":")
    }


def check_symbols(model_tar: Path | str) -> str:
    """The objects leave nothing undefined but what the TVM runtime (and libc) provides."""
    undefined = undefined_symbols(model_tar)
    foreign = sorted(s for s in undefined if not _RUNTIME_SYMBOL.match(s))
    if foreign:
        raise UserError(
            f"{model_tar}: undefined symbols the TVM runtime does not provide: {', '.join(foreign[:50])}"
        )
    return f"{len(undefined)} undefined symbols, all the TVM runtime's"


# --------------------------------------------------------------------------
# aarch64 (android): the objects link with the Debian cross toolchain
# --------------------------------------------------------------------------
# What an android app's link provides for the model library's objects: the
# TVM runtime (tvm-ffi C API ``TVMFFI*``, TVM's backend API ``TVMBackend*``,
# ``__tvm*`` module globals), libc (mem* and the stack protector), libm (the
# scalar math functions LLVM may call for exp/tanh/pow/erf/... in host code,
# with their ``f`` variants) and compiler-rt's half/bfloat conversions.
# What the tiny android builds (q0f32, q0f16) actually leave undefined is only
# TVMFFIEnvModLookupFromImports, TVMFFIEnvModRegisterSystemLibSymbol,
# TVMFFIErrorSetRaisedFromCStrParts, TVMFFIFunctionCall, TVMFFIHandleInitOnce.
_LIBM = (
    "exp|exp2|expm1|log|log2|log10|log1p|pow|sqrt|cbrt|sin|cos|tan|asin|acos|atan|atan2|"
    "sinh|cosh|tanh|asinh|acosh|atanh|erf|erfc|fabs|floor|ceil|round|lround|trunc|rint|"
    "nearbyint|fmod|fmin|fmax|fma|hypot|copysign|ldexp|frexp|sincos"
)
_AARCH64_LINK_ALLOWED = re.compile(
    r"^(TVMFFI\w+|TVMBackend\w+|__tvm\w+|"
    r"memcpy|memset|memmove|memcmp|abort|__stack_chk_fail|__stack_chk_guard|"
    rf"(?:{_LIBM})f?|"
    r"__extendhfsf2|__truncsfhf2|__truncdfhf2|__gnu_h2f_ieee|__gnu_f2h_ieee|__truncsfbf2)$"
)


def _aarch64_tool(name: str) -> str:
    import shutil

    path = shutil.which(f"aarch64-linux-gnu-{name}")
    if path is None:
        raise CheckUnavailable(
            f"no aarch64-linux-gnu-{name} on PATH (Debian: apt-get install binutils-aarch64-linux-gnu)"
        )
    return path


def check_aarch64_link(model_tar: Path | str) -> list[str]:
    """Link the objects of an android (aarch64) static build into one shared
    object with ``aarch64-linux-gnu-ld`` (relocations resolved, duplicate
    definitions and foreign object formats refused) and return the symbols it
    leaves undefined, sorted.  Raises :class:`UserError` when the link fails or
    when a symbol is left undefined that neither the TVM runtime nor libc/libm
    provides (see ``_AARCH64_LINK_ALLOWED``); :class:`CheckUnavailable` without
    the cross binutils."""
    import subprocess
    import tempfile

    ld, nm = _aarch64_tool("ld"), _aarch64_tool("nm")
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(model_tar) as tar:
            tar.extractall(tmp, filter="data")
        objects = sorted(str(p) for p in Path(tmp).rglob("*.o"))
        if not objects:
            raise UserError(f"{model_tar}: no object files")
        linked = str(Path(tmp) / "linked.so")
        proc = subprocess.run(
            [ld, "-shared", "--unresolved-symbols=ignore-all", "-o", linked, *objects],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise UserError(
                f"{model_tar}: the objects do not link with {ld}:\n{proc.stderr[:4000]}"
            )
        proc = subprocess.run([nm, "-u", "-D", linked], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise UserError(f"{nm} failed on the linked {model_tar}: {proc.stderr[:2000]}")
    undefined = sorted(
        {line.split()[-1].split("@")[0] for line in proc.stdout.splitlines() if line.strip()}
    )
    foreign = [s for s in undefined if not _AARCH64_LINK_ALLOWED.match(s)]
    if foreign:
        raise UserError(
            f"{model_tar}: linked with {Path(ld).name}, the objects leave undefined symbols that neither "
            f"the TVM runtime nor libc/libm provides: {', '.join(foreign[:50])}"
        )
    return undefined
