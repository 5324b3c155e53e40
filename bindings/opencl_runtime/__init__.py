"""The project's OpenCL runtime add-on for TVM (``opencl_runtime.cc`` here).

The apache-tvm wheel has no OpenCL runtime; ``scripts/setup_emulators.sh``
(``scripts/setup_emulators.d/opencl.sh``) builds ours into
``.emulators/lib/libtvm_runtime_opencl.so``.  ``load_opencl_runtime()`` loads
it into this process: afterwards ``tvm.opencl(0)`` is a device (on PoCL, say)
and libraries built for an OpenCL target load and run.

TVM itself picks the add-on up at ``import tvm`` when its directory is on
``LD_LIBRARY_PATH``; the explicit load here needs no environment.

:func:`why_unavailable` tells "not installed" (the add-on file, the OpenCL ICD
loader or any OpenCL driver is missing: a reason string) from "broken" (the
add-on file is not a loadable library, loads but registers no device API, or
drivers are installed and no device shows up: :class:`BrokenTool` is raised).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from ...errors import BrokenTool, UserError

ENV = "QWEN35_OPENCL_RUNTIME"
LIBRARY = "libtvm_runtime_opencl.so"
DEFAULT_PATH = Path(__file__).resolve().parents[2] / ".emulators" / "lib" / LIBRARY

_loaded: ctypes.CDLL | None = None


def runtime_path() -> Path:
    """Where the add-on is expected: ``$QWEN35_OPENCL_RUNTIME`` or ``.emulators/lib``."""
    return Path(os.environ[ENV]) if os.environ.get(ENV) else DEFAULT_PATH


class AddOnMissing(UserError):
    """The add-on, or a library it needs (the OpenCL ICD loader), is not installed."""


def opencl_icds() -> list[Path]:
    """The OpenCL drivers (ICD files) the ICD loader will find: ``$OCL_ICD_VENDORS``
    (a directory or one file) or ``$OPENCL_VENDOR_PATH``, else ``/etc/OpenCL/vendors``."""
    where = (
        os.environ.get("OCL_ICD_VENDORS")
        or os.environ.get("OPENCL_VENDOR_PATH")
        or "/etc/OpenCL/vendors"
    )
    path = Path(where)
    if path.is_file():
        return [path]
    return sorted(path.glob("*.icd")) if path.is_dir() else []


def _registered() -> bool:
    import tvm

    return tvm.get_global_func("ffi.Module.load_from_bytes.opencl", allow_missing=True) is not None


def load_opencl_runtime() -> None:
    """Make TVM's OpenCL device and module loader available in this process
    (idempotent).  Raises :class:`AddOnMissing` (a UserError) when the add-on
    or a library it links is not installed, :class:`BrokenTool` when it is
    there and does not load or registers nothing."""
    global _loaded
    if _loaded is not None:
        return
    from tvm.base import _LOADED_LIBS  # importing tvm first: the add-on links against its runtime

    if _registered():  # TVM autoloaded one (LD_LIBRARY_PATH) or someone loaded it before
        _loaded = _LOADED_LIBS.get("tvm_runtime_opencl") or ctypes.CDLL(None)
        return
    path = runtime_path()
    if not path.is_file():
        raise AddOnMissing(
            f"the OpenCL runtime add-on is not built ({path} is missing): run scripts/setup_emulators.sh "
            f"(or scripts/setup_emulators.d/opencl.sh), or point {ENV} at a libtvm_runtime_opencl.so"
        )
    try:
        lib = ctypes.CDLL(str(path), ctypes.RTLD_GLOBAL)
    except OSError as e:
        # "libOpenCL.so.1: cannot open shared object file": a library it links is not installed;
        # anything else (not an ELF file, wrong machine, undefined symbols) is a broken add-on.
        first = str(e).split(":", 1)[0].strip()
        if "cannot open shared object file" in str(e) and Path(first).name != path.name:
            raise AddOnMissing(
                f"{path} needs {first}, which is not installed (libOpenCL.so.1: the OpenCL ICD loader, "
                f"Debian ocl-icd-libopencl1; scripts/setup_emulators.sh installs it)"
            ) from e
        raise BrokenTool(
            f"{path}: the OpenCL runtime add-on exists but does not load ({e}); rebuild it with "
            f"scripts/setup_emulators.d/opencl.sh"
        ) from e
    if not _registered():
        raise BrokenTool(
            f"{path} loaded but registered no OpenCL device API (ffi.Module.load_from_bytes.opencl); "
            f"rebuild it with scripts/setup_emulators.d/opencl.sh"
        )
    _LOADED_LIBS["tvm_runtime_opencl"] = lib
    _loaded = lib


def opencl_device_count() -> int:
    """Number of OpenCL devices the add-on sees (0 without an ICD); loads the add-on."""
    import tvm

    load_opencl_runtime()
    f = tvm.get_global_func("qwen35.opencl_runtime.num_devices", allow_missing=True)
    if f is not None:
        return int(f())
    return 1 if tvm.opencl(0).exist else 0


def why_unavailable() -> str | None:
    """None when the add-on loads and sees an OpenCL device; a reason when
    something is not installed (the add-on, the ICD loader, any OpenCL driver
    such as PoCL).  Raises :class:`BrokenTool` when all of it is installed and
    does not work: the add-on does not load or registers nothing, drivers are
    installed and no device shows up, or anything else fails."""
    try:
        load_opencl_runtime()
    except AddOnMissing as err:
        return str(err)
    icds = opencl_icds()
    if not icds:
        return (
            "no OpenCL driver is installed (no ICD file in /etc/OpenCL/vendors or $OCL_ICD_VENDORS); "
            "install PoCL: scripts/setup_emulators.sh (Debian: pocl-opencl-icd)"
        )
    try:
        count = opencl_device_count()
    except Exception as err:  # noqa: BLE001 - installed, so any failure is a finding
        raise BrokenTool(
            f"the OpenCL runtime add-on failed to list devices: {type(err).__name__}: {err}"
        ) from err
    if count == 0:
        raise BrokenTool(
            f"OpenCL drivers are installed ({', '.join(map(str, icds))}) but the add-on sees no OpenCL device"
        )
    return None
