"""GPU schedules for the model, and the Relax pipeline that applies and checks them.

:func:`gpu_pipeline` is the ``relax_pipeline`` of ``tvm.compile`` for every GPU
target preset (OpenCL, Metal, WebGPU, CUDA).  It runs the sequence of TVM's
generic GPU backend (``relax.backend.gpu_generic``):

1. library dispatch (sampling, sort/scan kernels),
2. ``FuseTransposeMatmul`` (``x @ W.T`` reads W in place), legalization and
   fusion (``LegalizeOps``, ``AnnotateTIROpPattern``, ``FoldConstant``,
   ``FuseOps``, ``FuseTIR``),
3. dlight schedules (:func:`dlight_rules`): Matmul, GEMV, LowBatchGEMV, RMSNorm,
   Reduction, GeneralReduction, Transpose, then Fallback for anything
   elementwise.  The hand-written kernels (the paged-KV-cache attention and
   RoPE kernels, the Gated DeltaNet and causal-conv kernels of
   ``compile/kernels/gpu_*``) carry their own thread bindings and are marked
   scheduled, so dlight leaves them alone,
4. :func:`cap_unroll` -- no loop is unrolled more than :data:`MAX_UNROLL` (16)
   steps: dlight asks for ``pragma_auto_unroll_max_step`` 64 or 256, and
   Adreno's OpenCL compiler fails with ``CL_OUT_OF_HOST_MEMORY`` on kernels
   unrolled that much,
5. :func:`check_scheduled` -- every PrimFunc that runs on the device must have
   thread bindings; a kernel left unscheduled is a build error that names it
   (TVM itself would either fail later in ``VerifyMemory`` with a generic
   message or, worse, run it on one thread),
6. the generic GPU dataflow lowering and finalization passes.

Known TVM 0.27 defect worked around here: ``dl.gpu.Matmul`` segfaults inside
tensorize for target ``metal`` (seen on f16 and f32 matmuls), so the Metal
pipeline leaves it out; GEMV, LowBatchGEMV and Fallback then schedule the
matmuls (slower prefill, same results); on ``cuda`` it segfaults the same way on
float16 matmuls (:data:`MATMUL_F16_BROKEN_KINDS`), so there it takes fp32 ones only.
The other targets keep it.  ``dl.gpu.RMSNorm``
emits 8-lane fp32 vectors, which Metal and WGSL do not have: it runs on OpenCL
and CUDA only (tests/test_device_build.py pins both workarounds).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.relax.backend.gpu_generic import pipeline as _GPU_PASSES
from tvm.target import Target

from ..errors import UserError

__all__ = [
    "MATMUL_BROKEN_KINDS",
    "MATMUL_F16_BROKEN_KINDS",
    "MAX_UNROLL",
    "RMSNORM_BROKEN_KINDS",
    "UnscheduledKernelError",
    "cap_unroll",
    "check_scheduled",
    "dlight_rules",
    "gpu_pipeline",
    "unroll_steps",
]

#: The most loop iterations any schedule may unroll (explicitly or through
#: ``pragma_auto_unroll_max_step``).
MAX_UNROLL = 16

#: Target kinds on which ``dl.gpu.Matmul`` must not run (segfault in tensorize).
MATMUL_BROKEN_KINDS = frozenset({"metal"})

#: Target kinds on which ``dl.gpu.Matmul`` segfaults in tensorize on float16
#: operands (CUDA's tensor-core path, at the real model shapes: every fp16
#: matmul of qwen3.5-0.8b; at the tiny shapes only the vision merger's), so it
#: schedules fp32 matmuls only there.
MATMUL_F16_BROKEN_KINDS = frozenset({"cuda"})
#: Target kinds whose vector types have at most 4 lanes: ``dl.gpu.RMSNorm``
#: vectorizes fp32 loads by 8 (``float32x8``), which Metal ("Cannot convert type
#: float32x8 to Metal type") and WGSL cannot express, so it runs on OpenCL and
#: CUDA only; ``dl.gpu.GeneralReduction`` schedules the norms elsewhere.
RMSNORM_BROKEN_KINDS = frozenset({"metal", "webgpu"})

_LOG = logging.getLogger(__name__)
_SCHEDULED = "tirx.is_scheduled"
_UNROLL_STEP = "pragma_auto_unroll_max_step"
_UNROLL_EXPLICIT = "pragma_unroll_explicit"


class UnscheduledKernelError(UserError):
    """A device kernel without thread bindings."""


def dlight_rules(target: Target) -> list:
    """The dlight rules for ``target``, most specific first.

    ``dl.gpu.Matmul`` is left out for the kinds in :data:`MATMUL_BROKEN_KINDS`,
    ``dl.gpu.RMSNorm`` for those in :data:`RMSNORM_BROKEN_KINDS`.
    """
    from tvm.s_tir import dlight as dl

    rules = []
    if target.kind.name in MATMUL_F16_BROKEN_KINDS:
        rules.append(_NotFloat16(dl.gpu.Matmul()))
    elif target.kind.name not in MATMUL_BROKEN_KINDS:
        rules.append(dl.gpu.Matmul())
    rules += [dl.gpu.GEMV(), dl.gpu.LowBatchGEMV()]
    if target.kind.name not in RMSNORM_BROKEN_KINDS:
        rules.append(dl.gpu.RMSNorm())
    rules += [
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        dl.gpu.Transpose(),
        dl.gpu.Fallback(),
    ]
    return [_Tolerant(rule) for rule in rules]


def _reads_float16(func: tirx.PrimFunc) -> bool:
    """Whether any load of ``func`` reads a float16 tensor."""
    found = []

    def on_load(load):
        if load.source.dtype == "float16":
            found.append(load)

    tvm_ffi.structural_walk(func.body, [(tvm.ir.TensorLoad, on_load)], order="post")
    return bool(found)


class _NotFloat16:
    """A dlight rule that declines functions with a float16 buffer."""

    def __init__(self, rule):
        self.rule = rule

    def apply(self, func, target, tunable):
        if _reads_float16(func):
            return None
        return self.rule.apply(func, target, tunable)

    def is_target_available(self, target):
        return self.rule.is_target_available(target)

    def __repr__(self) -> str:
        return f"NotFloat16({type(self.rule).__name__})"


class _Tolerant:
    """A dlight rule that answers "not applicable" instead of raising.

    Some rules of TVM 0.27 raise on functions they half-match (``dl.gpu.RMSNorm``
    unpacks a fixed number of blocks: ``ValueError: too many values to unpack``
    on our fused norm + cast); the next rule then gets its turn, as if the rule
    had returned None.  A function no rule takes is reported by
    :func:`check_scheduled`.
    """

    def __init__(self, rule):
        self.rule = rule
        self.name = getattr(rule, "name", type(rule).__name__)

    def apply(self, func, target, tunable):
        try:
            return self.rule.apply(func, target, tunable)
        except (ValueError, IndexError, AssertionError, RuntimeError, TypeError, KeyError) as err:
            _LOG.debug("dlight %s does not apply: %s", self.name, str(err).splitlines()[-1:] or err)
            return None

    def is_target_available(self, target):
        return self.rule.is_target_available(target)

    def __repr__(self) -> str:
        return f"Tolerant({self.name})"


def gpu_graph_passes(target: Target) -> list:
    """Library dispatch, legalization and fusion: these decide the kernels of a
    GPU build and their names (the host twin of compile/twin.py runs the same)."""
    return _GPU_PASSES.library_dispatch_passes(target) + [
        relax.transform.FuseTransposeMatmul(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def gpu_kernel_passes(target: Target) -> list:
    """:func:`gpu_graph_passes`, then the dlight schedules: every kernel as the device runs it."""
    from tvm.s_tir import dlight as dl

    return gpu_graph_passes(target) + [dl.ApplyDefaultSchedule(*dlight_rules(target))]


def gpu_pipeline(target: Target, *, max_unroll: int = MAX_UNROLL) -> tvm.transform.Pass:
    """The Relax pipeline for a GPU ``target`` (see the module docstring)."""
    if target.kind.name == "llvm":
        raise ValueError("gpu_pipeline is for GPU targets; use schedule_cpu.cpu_pipeline for llvm")

    @tvm.transform.module_pass(opt_level=0, name="GPURelaxPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                gpu_kernel_passes(target)
                + _GPU_PASSES.dataflow_lower_passes(target)
                + _GPU_PASSES.finalize_passes(target)
                + [_check_pass(max_unroll)]
            )
            return seq(mod)

    return _pipeline


def _check_pass(max_unroll: int) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="CapUnrollAndCheckScheduled")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mod = cap_unroll(mod, max_unroll)
        check_scheduled(mod)
        return mod

    return _pass


# --------------------------------------------------------------------------
# Thread bindings
# --------------------------------------------------------------------------
def _is_host_function(func: tirx.PrimFunc) -> bool:
    """Functions TVM compiles for the host: shape computations (VMShapeLower,
    ComputePrimValue) and anything explicitly marked so."""
    return bool(func.attrs is not None and func.attrs.get("tirx.is_host_func", False))


def _has_thread_binding(func: tirx.PrimFunc) -> bool:
    found = []

    def on_for(loop):
        if loop.kind == tirx.ForKind.THREAD_BINDING:
            found.append(loop)

    def on_attr(attr):
        if attr.attr_key == "thread_extent":
            found.append(attr)

    tvm_ffi.structural_walk(func.body, [(tirx.For, on_for), (tirx.AttrStmt, on_attr)], order="post")
    return bool(found)


def _touches_buffers(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` reads or writes a tensor (one that does not runs on the host)."""
    found = []

    def on_store(_store):
        found.append(True)

    def on_load(_load):
        found.append(True)

    tvm_ffi.structural_walk(
        func.body, [(tirx.BufferStore, on_store), (tvm.ir.TensorLoad, on_load)], order="post"
    )
    return bool(found)


def unscheduled_kernels(mod: tvm.IRModule) -> list[str]:
    """Names of the device PrimFuncs of ``mod`` that have no thread binding."""
    names = []
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or _is_host_function(func):
            continue
        if not _has_thread_binding(func) and _touches_buffers(func):
            names.append(gvar.name_hint)
    return sorted(names)


def check_scheduled(mod: tvm.IRModule) -> None:
    """Raise :class:`UnscheduledKernelError` naming every device kernel of
    ``mod`` without thread bindings."""
    missing = unscheduled_kernels(mod)
    if missing:
        raise UnscheduledKernelError(
            f"{len(missing)} GPU kernel(s) have no schedule (no thread bindings), they would run on a "
            f"single GPU thread: {', '.join(missing)}; add a dlight rule or a hand-written schedule "
            "(compile/schedule_gpu.py)"
        )


# --------------------------------------------------------------------------
# Unrolling
# --------------------------------------------------------------------------
def _const(expr) -> int | None:
    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


def cap_unroll(mod: tvm.IRModule, max_unroll: int = MAX_UNROLL) -> tvm.IRModule:
    """Limit every unroll in the PrimFuncs of ``mod`` to ``max_unroll`` steps.

    ``pragma_auto_unroll_max_step`` annotations above the cap are lowered to it;
    loops of kind ``unrolled`` with a longer (or unknown) extent become serial.
    """
    updates = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            capped = _cap_func(func, max_unroll)
            if capped is not func:
                updates[gvar] = capped
    if not updates:
        return mod
    mod = (
        mod.clone()
        if hasattr(mod, "clone")
        else tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    )
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod


def _cap_func(func: tirx.PrimFunc, max_unroll: int) -> tirx.PrimFunc:
    if not any(_too_much(loop, max_unroll) for loop in _loops(func)):
        return func

    def on_for(loop, mutator):
        body = mutator.mutate(loop.body)
        kind, annotations = loop.kind, dict(loop.annotations)
        if kind == tirx.ForKind.UNROLLED and (
            _const(loop.extent) is None or _const(loop.extent) > max_unroll
        ):
            kind = tirx.ForKind.SERIAL
        step = annotations.get(_UNROLL_STEP)
        if step is not None and int(step) > max_unroll:
            annotations[_UNROLL_STEP] = tirx.IntImm("int32", max_unroll)
        explicit = annotations.get(_UNROLL_EXPLICIT)
        if (
            explicit is not None and int(explicit) > 1
        ):  # a flag; dlight's GEMV sometimes passes the factor
            annotations[_UNROLL_EXPLICIT] = tirx.IntImm("int32", 1)
        return tirx.For(
            loop.loop_var,
            loop.min,
            loop.extent,
            kind,
            body,
            loop.thread_binding,
            annotations,
            loop.step,
        )

    return tvm_ffi.structural_mutate(func, [(tirx.For, on_for)])


def _loops(func: tirx.PrimFunc) -> list:
    loops = []
    tvm_ffi.structural_walk(func.body, [(tirx.For, loops.append)], order="post")
    return loops


def _too_much(loop, max_unroll: int) -> bool:
    if loop.kind == tirx.ForKind.UNROLLED and (
        _const(loop.extent) is None or _const(loop.extent) > max_unroll
    ):
        return True
    step = loop.annotations.get(_UNROLL_STEP)
    explicit = loop.annotations.get(_UNROLL_EXPLICIT)
    return (step is not None and int(step) > max_unroll) or (
        explicit is not None and int(explicit) > 1
    )


def unroll_steps(mod: tvm.IRModule) -> Iterable[tuple[str, int]]:
    """(function, steps) for every unroll request in ``mod``: the
    ``pragma_auto_unroll_max_step`` annotations and the extents of ``unrolled``
    loops (-1 for an unknown extent).  For tests and reports."""
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        for loop in _loops(func):
            if loop.kind == tirx.ForKind.UNROLLED:
                extent = _const(loop.extent)
                yield gvar.name_hint, -1 if extent is None else extent
            step = loop.annotations.get(_UNROLL_STEP)
            if step is not None:
                yield gvar.name_hint, int(step)
