"""The runtime contract: refuse an artifact this runtime cannot run, with a
message that says why, instead of crashing inside the VM."""

from __future__ import annotations

import platform
from pathlib import Path

from ..errors import UserError
from .artifact import content_problems, header_problems, read_manifest, versions

# Devices the bindings run libraries on: the CPU, and OpenCL through the
# project's runtime add-on (bindings/opencl_runtime; PoCL on this machine).
RUNNABLE_DEVICES = ("cpu", "opencl")


def host_triple() -> str:
    """This machine's triple, as the compiler's presets name it."""
    machine = platform.machine()
    return {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(machine, machine)


def system_cpu() -> str:
    """This machine's CPU as LLVM names it (what ``mcpu=native`` compiles for)."""
    from tvm.target import codegen

    return codegen.llvm_get_system_cpu()


def why_not_runnable(manifest: dict) -> str | None:
    """None if this machine's runtime can run the artifact; else why not, in
    one line: another TVM or tvm-ffi, a target the bindings do not run here
    (a device build), OpenCL missing, another CPU."""
    runtime = versions()
    built = manifest.get("versions", {})
    for key in ("tvm", "tvm_ffi"):
        if built.get(key) != runtime[key]:
            return (
                f"the library was built with {key} {built.get(key)} but this runtime has "
                f"{runtime[key]}; recompile it or install {key} {built.get(key)}"
            )
    target, device = manifest.get("target"), manifest.get("device")
    if device not in RUNNABLE_DEVICES or manifest.get("host_triple") != host_triple():
        return f"built for target '{target}', which this machine cannot run (the Python bindings run 'host' builds)"
    if device == "opencl":
        from .opencl_runtime import why_unavailable

        reason = why_unavailable()
        if reason:
            return f"built for target '{target}' (OpenCL), which cannot run here: {reason}"
    built_cpu = manifest.get("tvm_target", {}).get("mcpu")
    if manifest.get("native_cpu") and built_cpu != system_cpu():
        return (
            f"the library was compiled for CPU '{built_cpu}', this machine is "
            f"'{system_cpu()}'; recompile it here"
        )
    return None


def _raise_first(artifact: Path, problems: list[str]) -> None:
    if problems:
        more = (
            f" (and {len(problems) - 1} more problems: `qwen35-mobile verify {artifact}` lists them)"
            if len(problems) > 1
            else ""
        )
        raise UserError(problems[0] + more)


def check_contract(artifact: Path, runs_here: bool = True) -> dict:
    """Return the manifest of a runnable, intact artifact, or raise a
    UserError that says in one line what is wrong: the manifest (corrupt, of
    another format, a key missing), then the runtime (versions, target, CPU),
    then the files (the cheap part of ``qwen35-mobile verify``: the library
    and the small files by sha256, the weight shards by size, whose md5 the
    loader checks, and the tensor cache against the manifest's parameters)."""
    manifest = read_manifest(artifact)
    _raise_first(artifact, header_problems(artifact, manifest))
    reason = why_not_runnable(manifest) if runs_here else None  # False: another runtime runs it
    if reason:
        raise UserError(f"{artifact}: {reason}")
    _raise_first(artifact, content_problems(artifact, manifest, full=False))
    return manifest
