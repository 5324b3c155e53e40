"""The runtime contract: refuse an artifact this runtime cannot run, with a
message that says why, instead of crashing inside the VM."""

from __future__ import annotations

from pathlib import Path

from ..compile.artifact import FORMAT_VERSION, read_manifest, sha256_file, versions
from ..errors import UserError
from ..targets import get_target


# Devices the bindings run libraries on: the CPU, and OpenCL through the
# project's runtime add-on (bindings/opencl_runtime; PoCL on this machine).
RUNNABLE_DEVICES = ("cpu", "opencl")


def check_contract(artifact: Path) -> dict:
    """Return the manifest of a runnable artifact, or raise UserError."""
    manifest = read_manifest(artifact)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{artifact}: artifact format {manifest.get('format_version')} is not {FORMAT_VERSION}; recompile it"
        )
    runtime = versions()
    built = manifest.get("versions", {})
    for key in ("tvm", "tvm_ffi"):
        if built.get(key) != runtime[key]:
            raise UserError(
                f"{artifact}: the library was built with {key} {built.get(key)} but this runtime has "
                f"{runtime[key]}; recompile it or install {key} {built.get(key)}"
            )
    target = manifest.get("target")
    preset = get_target(target) if isinstance(target, str) else None
    if (
        preset is None
        or preset.device not in RUNNABLE_DEVICES
        or preset.host_triple != get_target("host").host_triple
    ):
        raise UserError(
            f"{artifact}: built for target '{target}', which this machine cannot run "
            f"(the Python bindings run 'host' builds)"
        )
    if preset.device == "opencl":
        from .opencl_runtime import why_unavailable

        reason = why_unavailable()
        if reason:
            raise UserError(f"{artifact}: built for target '{target}' (OpenCL), which cannot run here: {reason}")
    built_cpu = manifest.get("tvm_target", {}).get("mcpu")
    if built_cpu and built_cpu != preset.resolved().get("mcpu"):
        raise UserError(
            f"{artifact}: the library was compiled for CPU '{built_cpu}', this machine is "
            f"'{preset.resolved().get('mcpu')}'; recompile it here"
        )
    library = Path(artifact) / manifest["library"]
    expected = manifest["files"].get(manifest["library"], {}).get("sha256")
    if not library.exists() or sha256_file(library) != expected:
        raise UserError(f"{library}: missing or altered since the build (sha256 does not match the manifest)")
    return manifest
