"""The project's OpenCL runtime add-on for TVM (``opencl_runtime.cc`` here).

The apache-tvm wheel has no OpenCL runtime; ``scripts/setup_emulators.sh``
(``scripts/setup_emulators.d/opencl.sh``) builds ours into
``.emulators/lib/libtvm_runtime_opencl.so``.  ``load_opencl_runtime()`` loads
it into this process: afterwards ``tvm.opencl(0)`` is a device (on PoCL, say)
and libraries built for an OpenCL target load and run.

TVM itself picks the add-on up at ``import tvm`` when its directory is on
``LD_LIBRARY_PATH``; the explicit load here needs no environment.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from ...errors import UserError

ENV = "QWEN35_OPENCL_RUNTIME"
LIBRARY = "libtvm_runtime_opencl.so"
DEFAULT_PATH = Path(__file__).resolve().parents[2] / ".emulators" / "lib" / LIBRARY

_loaded: ctypes.CDLL | None = None


def runtime_path() -> Path:
    """Where the add-on is expected: ``$QWEN35_OPENCL_RUNTIME`` or ``.emulators/lib``."""
    return Path(os.environ[ENV]) if os.environ.get(ENV) else DEFAULT_PATH


def _registered() -> bool:
    import tvm

    return tvm.get_global_func("ffi.Module.load_from_bytes.opencl", allow_missing=True) is not None


def load_opencl_runtime() -> None:
    """Make TVM's OpenCL device and module loader available in this process
    (idempotent).  Raises UserError when the add-on is not built."""
    global _loaded
    if _loaded is not None:
        return
    from tvm.base import _LOADED_LIBS  # importing tvm first: the add-on links against its runtime

    if _registered():  # TVM autoloaded one (LD_LIBRARY_PATH) or someone loaded it before
        _loaded = _LOADED_LIBS.get("tvm_runtime_opencl") or ctypes.CDLL(None)
        return
    path = runtime_path()
    if not path.is_file():
        raise UserError(
            f"the OpenCL runtime add-on is not built ({path} is missing): run scripts/setup_emulators.sh "
            f"(or scripts/setup_emulators.d/opencl.sh), or point {ENV} at a libtvm_runtime_opencl.so"
        )
    try:
        lib = ctypes.CDLL(str(path), ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise UserError(
            f"{path}: cannot load the OpenCL runtime add-on ({e}); rebuild it with scripts/setup_emulators.sh"
        ) from e
    if not _registered():
        raise UserError(f"{path} loaded but registered no OpenCL runtime; rebuild it with scripts/setup_emulators.sh")
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
    """None when the add-on loads and sees an OpenCL device, else why not."""
    try:
        load_opencl_runtime()
        if opencl_device_count() == 0:
            return "no OpenCL device is visible; install an OpenCL driver (PoCL: run scripts/setup_emulators.sh)"
    except UserError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - any driver failure means: not available
        return f"OpenCL does not work here: {err}"
    return None
