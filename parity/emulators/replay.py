"""Replay captured kernel calls on an emulated device and compare each with
its host twin.

Every call of a real run (parity/emulators/capture.py) is run again with
the device build of the same kernel, on the very tensors the twin saw before
the call; each tensor the kernel writes is compared with what the twin wrote.
A wrong kernel therefore shows up by name, with no error carried over from
the kernels before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from .capture import Call

#: Max relative error of one kernel's output (max |dev - twin| / max |twin|).
#: fp32: the two sides differ in summation order and exp/rsqrt rounding only
#: (measured <= 1e-6 on the tiny model).  fp16 tensors: one fp16 rounding of
#: an output (unit roundoff 4.9e-4) and fp16 accumulation order; 1e-2 leaves
#: room for a few ulps of the largest element, and a broken kernel is off by
#: O(1).
KERNEL_TOLERANCE = {"float32": 1e-4, "float16": 1e-2}

Runner = Callable[[str, object, list], list]  # (kernel name, PrimFunc, args) -> args after the run


def written_params(func) -> list[int]:
    """Indices of the parameters whose buffers ``func`` stores into.  (TVM 0.27:
    buffer parameters are Vars of BufferType and a buffer's ``data`` is the
    expression ``param.data``.)"""
    import tvm_ffi
    from tvm import tirx

    stored: set[int] = set()

    def root(expr):
        while not isinstance(expr, tirx.Var) and getattr(expr, "args", None):
            expr = expr.args[0]
        return expr

    def on_store(node):
        data = root(node.buffer.data)
        for i, param in enumerate(func.params):
            if data.same_as(param):
                stored.add(i)

    tvm_ffi.structural_walk(func.body, [(tirx.BufferStore, on_store)], order="post")
    return sorted(stored)


def is_device_function(func) -> bool:
    """Whether ``func`` launches GPU threads (host-only functions, e.g. shape
    computations, run in the host code of a GPU build, not on the device)."""
    from ...compile.schedule_gpu import _has_thread_binding

    return _has_thread_binding(func)


def compare(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max_rel, max_abs).  Equal values (also infinities) and NaN where the twin
    has NaN too count as equal: unwritten parts of a buffer keep whatever the
    allocation held, on both sides alike."""
    if got.shape != ref.shape:
        return float("inf"), float("inf")
    if ref.size == 0:
        return 0.0, 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        g, r = got.astype(np.float64), ref.astype(np.float64)
        same = (g == r) | (np.isnan(g) & np.isnan(r))  # bit-equal leftovers, infinities included
        diff = np.where(same, 0.0, np.abs(g - r))
    diff = np.where(np.isnan(diff), np.inf, diff)
    scale = np.abs(np.where(np.isfinite(r), r, 0.0)).max()
    max_abs = float(diff.max())
    return (max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))), max_abs


def device_name(
    call: Call, twin_names: dict[str, list[str]], device_names: dict[str, list[str]], kernels: dict
) -> str | None:
    """The device build's name for the twin's kernel ``call.name``.  VM calls
    keep their names; the KV cache's CPU kernels are named like the GPU ones
    with ``_cpu``, or else sit at the same position of the cache's kernel list."""
    if call.via == "vm":
        return call.name if call.name in kernels else None
    twin, dev = twin_names[call.via], device_names[call.via]
    plain = call.name.replace("_cpu", "")
    if plain in dev:
        return plain
    position = twin.index(call.name) if call.name in twin else len(dev)
    return dev[position] if position < len(dev) else None


def _row(call: Call, after: list, written: list[int], tolerance: float, **extra) -> dict:
    """The report row of one replayed call: the worst error of the ``written`` arguments."""
    errs = [
        compare(after[i], call.after[i]) for i in written if isinstance(call.after[i], np.ndarray)
    ]
    max_rel = max((e[0] for e in errs), default=0.0)
    return {
        "index": call.index,
        "kernel": call.name,
        "step": call.step,
        "via": call.via,
        **extra,
        "max_rel": max_rel,
        "max_abs": max((e[1] for e in errs), default=0.0),
        "status": "pass" if max_rel <= tolerance else "fail",
    }


def compare_calls(calls: list[Call], done: list[Call], tolerance: float) -> list[dict]:
    """Rows for calls the emulator ran in one batch (``done[i].after``: what
    it wrote); every tensor argument is compared (inputs agree trivially)."""
    return [
        _row(
            call,
            ran.after,
            [i for i, a in enumerate(call.after) if isinstance(a, np.ndarray)],
            tolerance,
            device_kernel=call.name,
        )
        for call, ran in zip(calls, done)
    ]


def replay(
    calls: list[Call],
    kernels: dict,
    names: Callable[[Call], str | None],
    run: Runner,
    *,
    dtype: str,
    tolerance: float | None = None,
    progress=print,
) -> list[dict]:
    """One row per captured call: the kernel, the step, the error of its outputs."""
    tol = tolerance if tolerance is not None else KERNEL_TOLERANCE[dtype]
    rows = []
    t0 = time.time()
    for n, call in enumerate(calls):
        if n % 25 == 0:
            progress(f"replay: {n}/{len(calls)} calls ({time.time() - t0:.0f} s)")
        row = {"index": call.index, "kernel": call.name, "step": call.step, "via": call.via}
        name = names(call)
        func = kernels.get(name) if name else None
        if func is None:
            rows.append(
                {**row, "status": "skipped", "why": "no kernel of that name in the device build"}
            )
            continue
        row["device_kernel"] = name
        if not is_device_function(func):
            rows.append(
                {
                    **row,
                    "status": "skipped",
                    "why": "host code in the device build (no GPU threads)",
                }
            )
            continue
        outs = written_params(func) or [
            i for i, a in enumerate(call.after) if isinstance(a, np.ndarray)
        ]
        try:
            after = run(name, func, list(call.before))
        except Exception as err:  # a kernel that fails to build or launch is a finding, not a crash
            rows.append(
                {
                    **row,
                    "status": "error",
                    "why": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}",
                }
            )
            continue
        rows.append(_row(call, after, outs, tol, device_kernel=name, outputs=outs))
    return rows


def summarize(rows: list[dict], tolerance: float) -> dict:
    ran = [r for r in rows if r["status"] in ("pass", "fail")]
    bad = [r for r in rows if r["status"] in ("fail", "error")]
    per_kernel: dict[str, float] = {}
    for r in ran:
        per_kernel[r["device_kernel"]] = max(per_kernel.get(r["device_kernel"], 0.0), r["max_rel"])
    return {
        "pass": not bad and bool(ran),
        "calls": len(rows),
        "replayed": len(ran),
        "skipped": len(rows) - len(ran) - sum(r["status"] == "error" for r in rows),
        "kernels": len(per_kernel),
        "max_rel": max((r["max_rel"] for r in ran), default=0.0),
        "tolerance": tolerance,
        "failing_kernels": sorted({r.get("device_kernel", r["kernel"]) for r in bad}),
        "first_failure": (
            {
                k: bad[0].get(k)
                for k in ("index", "kernel", "device_kernel", "step", "max_rel", "why")
            }
            if bad
            else None
        ),
        "worst_per_kernel": dict(sorted(per_kernel.items(), key=lambda kv: -kv[1])),
    }


def break_kernel(func):
    """``func`` with every floating-point store into a parameter scaled by 1.5
    and shifted by 0.25: a deliberately wrong kernel, for testing that the
    rig names the kernel that diverged."""
    import tvm_ffi
    from tvm import tirx

    params = [p for p in func.params]

    def is_param(store) -> bool:
        data = store.buffer.data
        while not isinstance(data, tirx.Var) and getattr(data, "args", None):
            data = data.args[0]
        return any(data.same_as(p) for p in params)

    def on_store(store):
        dtype = str(store.value.ty)
        if not is_param(store) or not dtype.startswith(("float", "bfloat")):
            return store
        wrong = store.value * tirx.const(1.5, dtype) + tirx.const(0.25, dtype)
        return tirx.BufferStore(store.buffer, wrong, list(store.indices))

    broken = tvm_ffi.structural_map(func.body, [(tirx.BufferStore, on_store)])
    return func.with_body(broken)
