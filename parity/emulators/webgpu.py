"""TVM's WGSL kernels on a WebGPU implementation of this machine: Dawn for Node
(npm ``webgpu``) on Vulkan, Mesa's lavapipe (a CPU Vulkan driver with ``shader-f16``).

Set up by ``scripts/setup_emulators.d/webgpu.sh`` (Mesa 25 from bookworm-backports,
the npm package pinned by ``parity/emulators/dawn/package-lock.json`` into
``.emulators/node``).  One persistent Node process (``dawn/run_wgsl.mjs``) serves
every request over JSON lines; array data travels through files in a temp folder.

* :func:`available` -- ``None``, or why Dawn/lavapipe cannot run here;
* :func:`check_shader_modules` -- create a shader module per WGSL kernel (a static check);
* :func:`run_primfunc` -- lower a scheduled TIR PrimFunc for ``webgpu`` as
  ``tvm.tirx.build`` does, launch each of its device kernels on Dawn exactly as
  TVM's web runtime (``tvm/web/src/webgpu.ts``) would, and return the buffers.

How a TVM WebGPU kernel is launched (mirrored from the web runtime): storage buffers
at ``@group(0) @binding(i)`` in the kernel's parameter order (read-only where the
WGSL declares ``var<storage, read>``), then one uniform ``PODArgs`` buffer: every
scalar parameter as 4 bytes (``int*`` as i32, ``uint*`` as u32, ``float*`` as f32)
followed by ``packGridDimX`` (u32).  The grid comes from the ``blockIdx.*`` values of
the host's ``call_ffi_kernel`` (``tirx.kernel_launch_params`` order); ``blockIdx.x``
of 65536 or more is folded into ``z`` (halving x), and the kernel returns early for
``blockIdx.z * gridDim.x + blockIdx.x > packGridDimX``.  The launch values, the
scalar arguments and the global scratch buffers that the host allocates between
kernels are computed by interpreting the host function (as it is right after
``SplitHostDevice``) with the concrete shapes.
"""

from __future__ import annotations

import atexit
import base64
import glob
import itertools
import json
import math
import os
import re
import select
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import BrokenTool

__all__ = [
    "BrokenTool",
    "DawnError",
    "KernelPlan",
    "adapter_info",
    "available",
    "check_shader_modules",
    "has_f16",
    "lower_for_dawn",
    "run_primfunc",
    "shutdown",
    "split_wgsl",
]

ROOT = Path(__file__).resolve().parents[2]  # the repository root (= package qwen35_mobile)
RUNNER = Path(__file__).resolve().parent / "dawn" / "run_wgsl.mjs"
NODE_PREFIX = Path(os.environ.get("QWEN35_EMULATORS", ROOT / ".emulators")) / "node"
WEBGPU_MODULE = NODE_PREFIX / "node_modules" / "webgpu" / "index.js"
SETUP = "scripts/setup_emulators.d/webgpu.sh"
#: Seconds one request may take (a cold lavapipe compiles big f16 kernels for minutes).
_TIMEOUT = float(os.environ.get("QWEN35_DAWN_TIMEOUT", "1800"))


class DawnError(RuntimeError):
    """Dawn refused a kernel (WGSL error, validation error) or the runner died."""


# ==========================================================================
# The Node runner
# ==========================================================================
def lavapipe_icd() -> str | None:
    """Mesa lavapipe's Vulkan ICD manifest, if installed."""
    for pattern in ("/usr/share/vulkan/icd.d/lvp_icd*.json", "/etc/vulkan/icd.d/lvp_icd*.json"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


#: The Node.js binary: ``$QWEN35_NODE`` (a path or a name on PATH), else ``node``.
NODE_ENV = "QWEN35_NODE"


def _node() -> str | None:
    return shutil.which(os.environ.get(NODE_ENV) or "node")


def _node_major(node: str) -> int:
    """Node's major version (``node --version``: ``v20.19.2``)."""
    done = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    m = re.match(r"v(\d+)\.", done.stdout.strip())
    if done.returncode != 0 or not m:
        raise BrokenTool(
            f"{node} --version failed (exit {done.returncode}): {(done.stdout + done.stderr).strip()[:500]}"
        )
    return int(m.group(1))


class _Runner:
    """One ``node run_wgsl.mjs`` process (or ``script``); requests are serialized.
    ``handshake``: the script says it is ready and answers ``info`` (run_wgsl.mjs)."""

    def __init__(self, script: Path | None = None, extra_env: dict | None = None, handshake=True):
        script = script or RUNNER  # looked up now: tests swap RUNNER for a broken launcher
        env = dict(os.environ, QWEN35_WEBGPU_MODULE=str(WEBGPU_MODULE), **(extra_env or {}))
        icd = os.environ.get("QWEN35_VK_ICD") or lavapipe_icd()
        if icd:
            env["VK_ICD_FILENAMES"] = icd  # lavapipe, whatever else is installed
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [_node(), str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
            cwd=str(script.parent),
        )
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        self.sent_kernels: set[str] = set()
        self.noise: list[str] = []  # what the runner printed besides replies (last 20 lines)
        if not handshake:
            return
        ready = self._read()
        if not ready.get("ok"):
            raise DawnError(ready.get("error") or "the Dawn runner did not start")
        self.info = self.request({"op": "info"})

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            lines = [
                ln for ln in self._stderr.read().splitlines() if "artificially reduced" not in ln
            ]
            return "\n".join(lines[-20:])
        except (OSError, ValueError):
            return ""

    def _read(self) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], _TIMEOUT)
        if not ready:
            self.proc.kill()
            self.proc.wait()
            raise DawnError(
                f"the Dawn runner did not answer in {_TIMEOUT:.0f} s (QWEN35_DAWN_TIMEOUT); killed it"
            )
        line = self.proc.stdout.readline()
        # Dawn's native code prints some validation errors to stdout itself: not replies.
        while line and not line.startswith("{"):
            self.noise.append(line.rstrip())
            del self.noise[:-20]
            line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=10)
            raise DawnError(
                f"the Dawn runner exited ({self.proc.returncode}): {self._stderr_tail()}"
            )
        try:
            reply = json.loads(line)
        except ValueError:
            raise DawnError(
                f"the Dawn runner wrote a line that is not a reply: {line[:500]!r}; "
                f"its stderr: {self._stderr_tail()}"
            ) from None
        if reply.get("fatal"):
            raise DawnError(reply.get("error"))
        return reply

    def request(self, req: dict) -> dict:
        with self.lock:
            req = dict(req, id=next(self.ids))
            try:
                self.proc.stdin.write(json.dumps(req) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError) as err:
                raise DawnError(f"the Dawn runner is gone: {err}: {self._stderr_tail()}") from err
            reply = self._read()
        if not reply.get("ok"):
            printed = "\n".join(self.noise)
            raise DawnError(
                reply.get("error", "unknown error")
                + (f"\nit printed: {printed}" if printed else "")
            )
        self.noise.clear()
        return reply

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.alive():
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


_RUNNER: _Runner | None = None
_RUNNER_LOCK = threading.Lock()
_UNAVAILABLE: str | None = None
_BROKEN: str | None = None  # why the installed emulator does not work (re-raised on every check)
_CHECKED = False


def _runner() -> _Runner:
    global _RUNNER
    with _RUNNER_LOCK:
        if _RUNNER is None or not _RUNNER.alive():
            _RUNNER = _Runner()
        return _RUNNER


def shutdown() -> None:
    """Stop the Node process (a later call starts a new one)."""
    global _RUNNER
    with _RUNNER_LOCK:
        if _RUNNER is not None:
            _RUNNER.close()
            _RUNNER = None


atexit.register(shutdown)


def available() -> str | None:
    """``None`` when Dawn can run kernels here, else why not (what to install).

    Only something missing is a reason: no Node.js (or one older than 18), no
    npm ``webgpu`` package, no lavapipe ICD.  When all of it is there and our
    launcher (``dawn/run_wgsl.mjs``) still cannot create a device -- it exits,
    prints a traceback, finds no adapter -- that is a failure of the installed
    emulator, not a missing one: :class:`BrokenTool` is raised (every call)."""
    global _UNAVAILABLE, _BROKEN, _CHECKED
    if _CHECKED:
        if _BROKEN:
            raise BrokenTool(_BROKEN)
        return _UNAVAILABLE
    why = None
    node = _node()
    if node is None:
        why = f"node (Node.js >= 18) is not installed ({os.environ.get(NODE_ENV) or 'node'} not found)"
    elif not WEBGPU_MODULE.exists():
        why = f"npm package webgpu (Dawn) is not installed in {NODE_PREFIX}: run {SETUP}"
    elif lavapipe_icd() is None and not os.environ.get("QWEN35_VK_ICD"):
        why = f"Mesa lavapipe (mesa-vulkan-drivers >= 24 from bookworm-backports) is not installed: run {SETUP}"
    else:
        try:
            major = _node_major(node)
            if major < 18:
                why = f"{node} is Node.js {major}; the Dawn launcher needs Node.js >= 18"
            else:
                _runner()
        except Exception as err:  # noqa: BLE001 - everything is installed: any failure is ours to fix
            _BROKEN, _CHECKED = (
                (
                    f"the WebGPU emulator is installed but does not work: {RUNNER.name} ({node}) "
                    f"could not create a WebGPU device: {type(err).__name__}: {err}"
                ),
                True,
            )
            raise BrokenTool(_BROKEN) from err
    _UNAVAILABLE, _CHECKED = why, True
    return why


def _require() -> _Runner:
    why = available()
    if why:
        raise DawnError(why)
    return _runner()


def adapter_info() -> dict:
    """The adapter (vendor, device, description), the device's features and limits."""
    info = _require().info
    return {k: info[k] for k in ("adapter", "features", "limits")}


def has_f16() -> bool:
    """Whether the device has ``shader-f16`` (Mesa 25 lavapipe has)."""
    return "shader-f16" in adapter_info()["features"]


def check_shader_modules(wgsl_sources: Mapping[str, str]) -> dict[str, str | None]:
    """``{kernel: None | Dawn's error messages}``: a shader module per WGSL source."""
    if not wgsl_sources:
        return {}
    reply = _require().request({"op": "check", "sources": dict(wgsl_sources)})
    return {name: reply["errors"].get(name) for name in wgsl_sources}


# ==========================================================================
# Lowering: device kernels, their WGSL, and the host function that launches them
# ==========================================================================
@dataclass
class _Kernel:
    name: str
    code: str
    key: str  # unique name of (code) in the runner's cache
    params: list  # device PrimFunc params (tirx.Var)
    launch_tags: list[str]
    access: list[str]  # per storage binding: "read" | "read_write"
    pod_types: list[str]  # WGSL types of the PODArgs fields (without packGridDimX)


@dataclass
class KernelPlan:
    """A PrimFunc lowered for WebGPU: its kernels and its host function (after
    ``SplitHostDevice``), ready to run with concrete arguments (:meth:`run`)."""

    name: str
    host: Any  # tirx.PrimFunc
    kernels: dict[str, _Kernel]
    source: str  # the whole WGSL (inspect_source of the webgpu module)
    params: list = field(default_factory=list)

    @property
    def kernel_sources(self) -> dict[str, str]:
        return {k.name: k.code for k in self.kernels.values()}

    def run(
        self,
        args: Sequence[np.ndarray | int | float],
        *,
        read_all: bool = False,
        scalars_as_none: bool = False,
    ) -> list[np.ndarray | None]:
        """One array per buffer parameter after the run (see :func:`run_primfunc`)."""
        outs = _run_plan(self, args, read_all=read_all)
        if not scalars_as_none:
            return outs
        it = iter(outs)
        return [None if not isinstance(a, np.ndarray) else next(it) for a in args]


_PLANS: dict[tuple, KernelPlan] = {}
_KEY_COUNTER = itertools.count()


def _as_target(target):
    import tvm
    from tvm.target import Target

    if target is None:
        target = Target.current(allow_none=True) or {"kind": "webgpu"}
    if isinstance(target, str):
        from ...targets import PRESETS

        # a preset name ("webgpu" is one: its limits and wasm32 host), else a kind
        target = PRESETS[target].tvm_target() if target in PRESETS else {"kind": target}
    target = target if isinstance(target, Target) else Target(target)
    if target.kind.name != "webgpu":
        raise ValueError(
            f"target kind {target.kind.name!r}: the Dawn launcher runs webgpu kernels only"
        )
    if target.host is None:
        target = target.with_host(tvm.target.Target({"kind": "llvm"}))
    return target


def _single_func(func_or_mod, func_name: str | None):
    import tvm
    from tvm import tirx

    if isinstance(func_or_mod, tirx.PrimFunc):
        name = (
            func_name
            or (func_or_mod.attrs.get("global_symbol") if func_or_mod.attrs else None)
            or "main"
        )
        return str(name), func_or_mod
    if isinstance(func_or_mod, tvm.IRModule):
        prims = [
            (gv.name_hint, f)
            for gv, f in func_or_mod.functions_items()
            if isinstance(f, tirx.PrimFunc)
        ]
        if func_name is not None:
            prims = [(n, f) for n, f in prims if n == func_name]
        if len(prims) != 1:
            names = [n for n, _ in prims]
            raise ValueError(f"expected one PrimFunc (pass func_name=...); found {names}")
        return prims[0]
    raise TypeError(
        f"run_primfunc needs a tirx.PrimFunc or an IRModule with one, not {type(func_or_mod).__name__} "
        "(a built runtime module has lost the launch dimensions: pass the scheduled TIR)"
    )


_BINDING = re.compile(r"@group\(0\)\s*@binding\((\d+)\)\s*var<storage,\s*(read_write|read)>")
_POD_STRUCT = re.compile(r"struct PODArgs\s*\{([^}]*)\}")


def _parse_wgsl(code: str) -> tuple[list[str], list[str]]:
    access = [a for _, a in sorted((int(i), a) for i, a in _BINDING.findall(code))]
    pod_types = []
    m = _POD_STRUCT.search(code)
    if m:
        for line in m.group(1).split(","):
            if ":" in line:
                name, ty = (s.strip() for s in line.split(":", 1))
                if name != "packGridDimX":
                    pod_types.append(ty)
    return access, pod_types


def split_wgsl(source: str) -> dict[str, str]:
    """``{kernel: WGSL}`` from a webgpu module's ``inspect_source()`` (``// Function:`` markers)."""
    out: dict[str, str] = {}
    for chunk in source.split("// Function: ")[1:]:
        name, _, body = chunk.partition("\n")
        body = body.strip()
        if body.startswith("//"):
            body = body.split("\n", 1)[1] if "\n" in body else ""
        if body.strip():
            out[name.strip()] = body
    return out


def lower_for_dawn(func_or_mod, target=None, *, func_name: str | None = None) -> KernelPlan:
    """Lower one scheduled PrimFunc for ``webgpu`` (``tvm.tirx.build``'s pipeline) and
    keep what launching its kernels needs.  Cached per (function, target)."""
    import tvm
    import tvm_ffi
    from tvm import tirx
    from tvm.tirx.build import codegen_build, split_host_device_mods

    target = _as_target(target)
    name, func = _single_func(func_or_mod, func_name)
    cache_key = (tvm_ffi.structural_hash(func), name, str(target), str(target.host))
    plan = _PLANS.get(cache_key)
    if plan is not None:
        return plan
    if func.attrs is None or func.attrs.get("global_symbol") != name:
        func = func.with_attr("global_symbol", name)
    mod = tvm.IRModule({name: func})

    captured = {}

    @tvm.instrument.pass_instrument
    class _Capture:
        def run_after_pass(self, m, info):
            if info.name.endswith("SplitHostDevice"):
                captured["mod"] = m

    current = tvm.transform.PassContext.current()
    with tvm.transform.PassContext(
        opt_level=current.opt_level,
        config=dict(current.config.items()) if current.config else None,
        required_pass=list(current.required_pass),
        disabled_pass=list(current.disabled_pass),
        instruments=list(current.instruments) + [_Capture()],
    ):
        with target:
            bound = tirx.transform.BindTarget(target)(mod)
            pipeline, _finalize_host, finalize_device = tirx.get_tir_pipeline("default")
            lowered = pipeline(bound)
            _host_mod, device_mods = split_host_device_mods(lowered)
            device_mods = {t: finalize_device()(m) for t, m in device_mods.items()}
            webgpu_mods = [codegen_build(m, t) for t, m in device_mods.items() if len(m.functions)]
    if "mod" not in captured:
        raise DawnError(f"{name}: SplitHostDevice did not run")
    split = captured["mod"]
    host = None
    device_funcs = {}
    for gv, f in split.functions_items():
        if not isinstance(f, tirx.PrimFunc):
            continue
        if f.attrs is not None and int(f.attrs.get("calling_conv", 0)) == 2:
            device_funcs[gv.name_hint] = f
        elif gv.name_hint == name:
            host = f
    if host is None:
        raise DawnError(f"{name}: no host function after SplitHostDevice")
    source = "\n".join(m.inspect_source() for m in webgpu_mods)
    codes = split_wgsl(source)
    kernels = {}
    for kname, kf in device_funcs.items():
        if kname not in codes:
            raise DawnError(f"{name}: no WGSL for kernel {kname} (have {sorted(codes)})")
        code = codes[kname]
        access, pod_types = _parse_wgsl(code)
        tags = [str(t) for t in (kf.attrs.get("tirx.kernel_launch_params") or [])]
        kernels[kname] = _Kernel(
            name=kname,
            code=code,
            key=f"{kname}#{next(_KEY_COUNTER)}",
            params=list(kf.params),
            launch_tags=tags,
            access=access,
            pod_types=pod_types,
        )
    plan = KernelPlan(
        name=name, host=host, kernels=kernels, source=source, params=list(host.params)
    )
    _PLANS[cache_key] = plan
    return plan


# ==========================================================================
# The host function, interpreted with concrete shapes
# ==========================================================================
@dataclass(frozen=True)
class _Slot:
    index: int


class _Unsupported(DawnError):
    pass


def _c_div(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return a / b
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _c_mod(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return math.fmod(a, b)
    return a - _c_div(a, b) * b


def _cast(dtype: str, v):
    if dtype.startswith("float") or dtype.startswith("bfloat"):
        return float(v)
    if dtype == "bool":
        return bool(v)
    if dtype.startswith("int") or dtype.startswith("uint"):
        v = int(v)
        bits = (
            int(dtype[3:] if dtype.startswith("int") else dtype[4:])
            if dtype not in ("int", "uint")
            else 32
        )
        v &= (1 << bits) - 1
        if dtype.startswith("int") and v >= 1 << (bits - 1):
            v -= 1 << bits
        return v
    if dtype == "handle":
        return v
    raise _Unsupported(f"cast to {dtype}")


class _Host:
    """Interprets a host PrimFunc after SplitHostDevice: binds shape variables,
    allocates scratch buffers, collects the kernel launches."""

    def __init__(self, plan: KernelPlan):
        from tvm import tirx

        self.t = tirx
        self.plan = plan
        self.env: dict = {}
        self.slots: list[dict] = []  # {"size": bytes, "array": np.ndarray | None, "dtype", "shape"}
        self.dispatches: list[dict] = []
        self._binops = {
            tirx.Add: lambda a, b: a + b,
            tirx.Sub: lambda a, b: a - b,
            tirx.Mul: lambda a, b: a * b,
            tirx.Div: _c_div,
            tirx.Mod: _c_mod,
            tirx.FloorDiv: lambda a, b: a // b if not isinstance(a, float) else math.floor(a / b),
            tirx.FloorMod: lambda a, b: a % b,
            tirx.Min: min,
            tirx.Max: max,
            tirx.EQ: lambda a, b: a == b,
            tirx.NE: lambda a, b: a != b,
            tirx.LT: lambda a, b: a < b,
            tirx.LE: lambda a, b: a <= b,
            tirx.GT: lambda a, b: a > b,
            tirx.GE: lambda a, b: a >= b,
            tirx.And: lambda a, b: bool(a) and bool(b),
            tirx.Or: lambda a, b: bool(a) or bool(b),
            tirx.BitwiseAnd: lambda a, b: a & b,
            tirx.BitwiseOr: lambda a, b: a | b,
            tirx.BitwiseXor: lambda a, b: a ^ b,
            tirx.LShift: lambda a, b: a << b,
            tirx.RShift: lambda a, b: a >> b,
        }

    # -- expressions
    def eval(self, e):
        t = self.t
        if isinstance(e, (int, float)):
            return e
        if isinstance(e, t.IntImm):
            return bool(e.value) if _dt(e) == "bool" else int(e.value)
        if isinstance(e, t.FloatImm):
            return float(e.value)
        if isinstance(e, t.Var):
            try:
                return self.env[e]
            except KeyError:
                raise _Unsupported(f"unbound variable {e.name} in the host function") from None
        op = self._binops.get(type(e))
        if op is not None:
            return op(self.eval(e.a), self.eval(e.b))
        if isinstance(e, t.Not):
            return not self.eval(e.a)
        if isinstance(e, t.Select):
            return self.eval(e.true_value) if self.eval(e.condition) else self.eval(e.false_value)
        if isinstance(e, t.Cast):
            return _cast(_dt(e), self.eval(e.value))
        if isinstance(e, t.Let):
            self.env[e.var] = self.eval(e.value)
            return self.eval(e.body)
        if _is_call(e):
            name = _op_name(e)
            if name in ("prim.if_then_else", "tirx.if_then_else"):
                c, a, b = e.args
                return self.eval(a) if self.eval(c) else self.eval(b)
            if name == "tirx.buffer_data":
                return self.eval(e.args[0])
            if name == "tirx.reinterpret" and _dt(e) == "handle":
                return self.eval(e.args[0])
        raise _Unsupported(f"cannot evaluate {type(e).__name__} on the host: {e}")

    # -- statements
    def exec(self, s):
        t = self.t
        if isinstance(s, t.SeqStmt):
            for x in s.seq:
                self.exec(x)
        elif isinstance(s, t.Bind):
            self.env[s.var] = self.eval(s.value)
            body = getattr(s, "body", None)
            if body is not None:
                self.exec(body)
        elif isinstance(s, t.AttrStmt):
            self.exec(s.body)
        elif isinstance(s, t.DeclBuffer):
            data = getattr(s, "data", None)
            if data is not None:
                try:
                    self.env[s.buffer] = self.eval(data)
                except _Unsupported:
                    pass  # a view the kernels never see
            body = getattr(s, "body", None)
            if body is not None:
                self.exec(body)
        elif isinstance(s, t.AllocBuffer):
            self._alloc(s.buffer)
            body = getattr(s, "body", None)
            if body is not None:
                self.exec(body)
        elif isinstance(s, t.Evaluate):
            self._call(s.value)
        elif isinstance(s, t.IfThenElse):
            if self.eval(s.condition):
                self.exec(s.then_case)
            elif s.else_case is not None:
                self.exec(s.else_case)
        elif isinstance(s, t.For):
            if s.kind not in (t.ForKind.SERIAL, t.ForKind.UNROLLED):
                raise _Unsupported(f"host loop of kind {s.kind}")
            start, extent = self.eval(s.min), self.eval(s.extent)
            step = self.eval(s.step) if s.step is not None else 1
            for i in range(start, start + extent, step):
                self.env[s.loop_var] = i
                self.exec(s.body)
        elif isinstance(s, t.AssertStmt):
            try:
                ok = self.eval(s.condition)
            except _Unsupported:
                ok = True
            if not ok:
                parts = getattr(s, "message_parts", None) or [getattr(s, "message", "")]
                text = "".join(str(getattr(x, "value", x)) for x in parts)
                raise ValueError(f"{self.plan.name}: host assertion failed: {s.condition}: {text}")
            body = getattr(s, "body", None)
            if body is not None:
                self.exec(body)
        else:
            raise _Unsupported(
                f"{self.plan.name}: host statement {type(s).__name__} is not supported"
            )

    def _alloc(self, buf):
        scope = buf.scope()
        if scope not in ("global", ""):
            raise _Unsupported(f"{self.plan.name}: host allocation {buf.name} in scope {scope}")
        shape = [int(self.eval(x)) for x in buf.shape]
        dtype = np.dtype(_np_dtype(str(buf.dtype)))
        n = int(np.prod(shape)) if shape else 1
        self.env[buf] = _Slot(len(self.slots))
        self.slots.append({"size": n * dtype.itemsize, "array": None, "name": buf.name})

    def _call(self, call):
        if not _is_call(call):
            return
        if _op_name(call) == "tirx.call_ffi_kernel":
            self._launch(call)
            return
        name = _op_name(call)
        if (
            name in ("tirx.tvm_call_packed", "tirx.call_packed")
            and call.args
            and str(call.args[0].value) == "__tvm_set_device"
        ):
            return
        raise _Unsupported(
            f"{self.plan.name}: host call {name} {call.args[0] if call.args else ''}"
        )

    def _launch(self, call):
        kname = str(call.args[0].value)
        kernel = self.plan.kernels.get(kname)
        if kernel is None:
            raise DawnError(f"{self.plan.name}: host launches unknown kernel {kname}")
        args = list(call.args[1:])
        ntags = len(kernel.launch_tags)
        if len(args) != len(kernel.params) + ntags:
            raise DawnError(
                f"{kname}: {len(args)} launch arguments for {len(kernel.params)} params + {ntags} launch params"
            )
        values = [self.eval(a) for a in args]
        params, launch = values[: len(kernel.params)], values[len(kernel.params) :]
        bind, pods = [], []
        for p, v in zip(kernel.params, params):
            if _dt(p) == "handle":
                if not isinstance(v, _Slot):
                    raise DawnError(f"{kname}: buffer argument {p.name} is not a known buffer")
                bind.append(v.index)
            else:
                pods.append((_dt(p), v))
        work = [1] * 6
        for tag, v in zip(kernel.launch_tags, launch):
            if tag.startswith("blockIdx."):
                work["xyz".index(tag[-1])] = int(v)
            elif tag.startswith("threadIdx."):
                work[3 + "xyz".index(tag[-1])] = int(v)
            elif tag.startswith("paramWriteAccess:"):
                pass
            else:
                raise _Unsupported(f"{kname}: launch parameter {tag}")
        if work[2] != 1:
            raise DawnError(f"{kname}: WebGPU: blockIdx.z is reserved for internal use")
        pack_x = work[0]
        if work[0] >= 1 << 16:  # as tvm/web/src/webgpu.ts: spread x into z
            wx, wz = work[0], work[2]
            while wx >= 1 << 16:
                wx = wx // 2 if wx % 2 == 0 else (wx + 1) // 2
                wz *= 2
            work[0], work[2] = wx, wz
        if len(kernel.access) != len(bind):
            raise DawnError(
                f"{kname}: the WGSL binds {len(kernel.access)} storage buffers, the kernel has {len(bind)}"
            )
        if kernel.pod_types and len(kernel.pod_types) != len(pods):
            raise DawnError(
                f"{kname}: PODArgs has {len(kernel.pod_types)} scalar fields, the kernel {len(pods)} scalars"
            )
        raw = bytearray()
        for i, (dtype, v) in enumerate(pods):
            wty = kernel.pod_types[i] if i < len(kernel.pod_types) else None
            if wty not in (None, "i32", "u32", "f32"):
                raise DawnError(
                    f"{kname}: PODArgs field {i} has WGSL type {wty}; TVM's runtime writes 4-byte scalars only"
                )
            if dtype.startswith("int") or dtype == "bool":
                raw += struct.pack("<i", _cast("int32", v))
            elif dtype.startswith("uint"):
                raw += struct.pack("<I", int(v) & 0xFFFFFFFF)
            elif dtype.startswith("float"):
                raw += struct.pack("<f", float(v))
            else:
                raise DawnError(f"{kname}: scalar argument of type {dtype}")
        raw += struct.pack("<I", pack_x & 0xFFFFFFFF)
        self.dispatches.append(
            {
                "kernel": kernel.key,
                "bind": bind,
                "access": kernel.access,
                "pod": base64.b64encode(bytes(raw)).decode(),
                "grid": work[:3],
                "_kernel": kernel,
            }
        )


def _solve_dim(h: _Host, dim, n: int) -> bool:
    """Bind the one unknown variable of ``dim == n``; False when it cannot (yet)."""
    from tvm import tirx

    try:
        h.eval(dim)
        return True  # nothing unknown: the shape check decides
    except _Unsupported:
        pass
    if isinstance(dim, tirx.Var):
        h.env[dim] = n
        return True
    if isinstance(dim, (tirx.Add, tirx.Sub, tirx.Mul)):
        for unknown, known, first in ((dim.a, dim.b, True), (dim.b, dim.a, False)):
            try:
                c = h.eval(known)
            except _Unsupported:
                continue
            if isinstance(dim, tirx.Add):
                target = n - c
            elif isinstance(dim, tirx.Sub):
                target = n + c if first else c - n
            else:
                if c == 0 or n % c:
                    return False
                target = n // c
            return _solve_dim(h, unknown, target)
    if isinstance(dim, tirx.Cast):
        return _solve_dim(h, dim.value, n)
    return False


def _dt(x) -> str:
    """dtype of a TIR expression or variable ("handle" for pointers)."""
    d = getattr(getattr(x, "ty", None), "dtype", None)
    return "handle" if d is None else str(d)


def _is_call(x) -> bool:
    import tvm

    return isinstance(x, tvm.ir.expr.Call)


def _op_name(call) -> str:
    return str(getattr(call.op, "name", call.op))


def _np_dtype(dtype: str):
    if dtype == "bool":
        return np.bool_
    return np.dtype(dtype)


_TMP: Path | None = None


def _tmpdir() -> Path:
    global _TMP
    if _TMP is None or not _TMP.exists():
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        _TMP = Path(tempfile.mkdtemp(prefix="qwen35-dawn-", dir=base))
        atexit.register(shutil.rmtree, str(_TMP), True)
    return _TMP


def _run_plan(plan: KernelPlan, args: Sequence, *, read_all: bool = False) -> list[np.ndarray]:
    from tvm import tirx

    host = plan.host
    if len(args) != len(host.params):
        raise ValueError(f"{plan.name}: {len(args)} arguments for {len(host.params)} parameters")
    h = _Host(plan)
    buffers = []  # (param position, Buffer, array)
    pending = []  # (shape expression, its size) not bound by a bare variable
    # Bind shape variables from the arrays, then check every extent.
    for i, (p, a) in enumerate(zip(host.params, args)):
        buf = p if isinstance(getattr(p, "ty", None), tirx.BufferType) else None
        if buf is None:
            if isinstance(a, np.ndarray):
                raise TypeError(f"{plan.name}: parameter {i} ({p.name}) is a scalar, got an array")
            h.env[p] = _cast(_dt(p), a) if _dt(p) != "handle" else a
            continue
        arr = np.asarray(a)
        want = np.dtype(_np_dtype(str(buf.dtype)))
        if arr.dtype != want:
            raise TypeError(f"{plan.name}: {buf.name} is {want}, got {arr.dtype}")
        if len(arr.shape) != len(buf.shape):
            raise ValueError(
                f"{plan.name}: {buf.name} has {len(buf.shape)} dims, got shape {arr.shape}"
            )
        for dim, n in zip(buf.shape, arr.shape):
            if isinstance(dim, tirx.Var) and dim not in h.env:
                h.env[dim] = int(n)
            elif not isinstance(dim, tirx.IntImm):
                pending.append((dim, int(n)))
        if isinstance(buf.elem_offset, tirx.Var) and buf.elem_offset not in h.env:
            h.env[buf.elem_offset] = 0
        for j, st in enumerate(buf.strides or []):
            if isinstance(st, tirx.Var) and st not in h.env:
                h.env[st] = int(np.prod(arr.shape[j + 1 :])) if j + 1 < len(arr.shape) else 1
        h.env[buf] = _Slot(len(h.slots))
        h.slots.append({"size": arr.nbytes, "array": np.ascontiguousarray(arr), "name": buf.name})
        buffers.append((i, buf, arr))
    # Shape variables seen only inside expressions (``batch_size + 1``): solve ``v + c``,
    # ``v - c``, ``v * c`` for the one unknown.
    while pending:
        left = [(d, n) for d, n in pending if not _solve_dim(h, d, n)]
        if len(left) == len(pending):
            break
        pending = left
    for _i, buf, arr in buffers:
        want = tuple(int(h.eval(d)) for d in buf.shape)
        if want != tuple(arr.shape):
            raise ValueError(
                f"{plan.name}: {buf.name} must have shape {want}, got {tuple(arr.shape)}"
            )
    h.exec(host.body)

    runner = _require()
    tmp = _tmpdir()
    stamp = next(_KEY_COUNTER)
    written = {
        b for d in h.dispatches for b, acc in zip(d["bind"], d["access"]) if acc == "read_write"
    }
    req_buffers = []
    for k, slot in enumerate(h.slots):
        path = None
        if slot["array"] is not None and slot["size"]:
            path = tmp / f"{stamp}-{k}.in"
            slot["array"].tofile(path)
        req_buffers.append({"size": slot["size"], "file": str(path) if path else None})
    reads = []
    for _i, buf, arr in buffers:
        slot_index = h.env[buf].index
        if (slot_index in written or read_all) and arr.nbytes:
            reads.append([slot_index, str(tmp / f"{stamp}-{slot_index}.out")])
    kernels = {}
    for d in h.dispatches:
        kern = d.pop("_kernel")
        if kern.key not in runner.sent_kernels:
            kernels[kern.key] = {"code": kern.code, "entry": kern.name}
    try:
        runner.request(
            {
                "op": "run",
                "kernels": kernels,
                "buffers": req_buffers,
                "dispatches": h.dispatches,
                "read": reads,
            }
        )
        runner.sent_kernels.update(kernels)
        results = {}
        for slot_index, path in reads:
            results[slot_index] = np.fromfile(path, dtype=h.slots[slot_index]["array"].dtype)
    finally:
        for k in range(len(h.slots)):
            for suffix in ("in", "out"):
                try:
                    os.unlink(tmp / f"{stamp}-{k}.{suffix}")
                except FileNotFoundError:
                    pass
    out = []
    for _i, buf, arr in buffers:
        slot_index = h.env[buf].index
        if slot_index in results:
            out.append(results[slot_index].reshape(arr.shape))
        else:
            out.append(np.array(arr, copy=True))
    return out


def run_primfunc(
    func_or_mod,
    target=None,
    args: Sequence[np.ndarray | int | float] = (),
    *,
    func_name: str | None = None,
    scalars_as_none: bool = False,
) -> list[np.ndarray | None]:
    """Run a scheduled PrimFunc's WebGPU kernels on Dawn.

    ``func_or_mod``: a ``tirx.PrimFunc`` (scheduled: thread bindings) or an IRModule
    holding it (``func_name`` picks one of several); ``target``: a webgpu Target, a
    target dict, ``"webgpu"`` or a preset name (default: the current target, else
    ``{"kind": "webgpu"}``); ``args``: in the PrimFunc's parameter order, numpy
    arrays for buffer parameters (dtype and shape as the buffer; shape variables are
    bound from them) and Python ints/floats for scalar parameters.

    Returns one array per buffer parameter, in parameter order, after all kernels
    ran (inputs that no kernel writes come back as copies, without a read-back);
    with ``scalars_as_none`` one entry per argument instead, ``None`` for scalars
    (as ``capture.Call.after``).
    Lowering is cached per (function, target); the Node process persists.
    """
    return lower_for_dawn(func_or_mod, target, func_name=func_name).run(
        args, scalars_as_none=scalars_as_none
    )
