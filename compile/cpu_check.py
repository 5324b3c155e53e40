"""What the CPU schedules promise, checked on the code they lower to.

A rule that takes a kernel (``compile/schedule_cpu.py``) means it to run on
every core and in vector registers.  Two things can silently undo that: a rule
that marks a loop ``vectorized`` whose body TVM's ``VectorizeLoop`` then
scalarises (a condition that differs between lanes, a gather it cannot
express; the loop is quietly turned back into a serial one), and a rule that
finds nothing to vectorise or parallelise and leaves the kernel as it was.
Neither shows in the scheduled TIR's loop kinds, so this check lowers every
scheduled kernel through the first half of TVM's ``s_tir`` pipeline, up to and
including ``VectorizeLoop``, and looks at what came out:

* **vector**: some memory access is a vector (a ``Ramp`` index, which is what
  a vectorised load or store is after ``VectorizeLoop``; a scalarised loop has
  none);
* **parallel**: a ``parallel`` loop survives (needed where the work is large
  or its size symbolic: more than :data:`PARALLEL_MIN_ITERATIONS` iterations).

Checked: the kernels the rules scheduled and the hand-written ones
(``compile/kernels``), i.e. every function marked ``tirx.is_scheduled``, except
TVM's paged-KV-cache kernels (:data:`TVM_KV_CACHE_KERNELS`: TVM writes them
serial).  A kernel that fails is a build error (:class:`UnscheduledKernelError`)
naming it and what it lacks, unless one of :data:`EXEMPTIONS` covers it, each
with its reason.  Lowering the scheduled kernels costs about a second at the
0.8B shape (90 kernels); the real build lowers them again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.target import Target

from .schedule_gpu import UnscheduledKernelError

__all__ = [
    "EXEMPTIONS",
    "PARALLEL_MIN_ITERATIONS",
    "TINY_ITERATIONS",
    "TVM_KV_CACHE_KERNELS",
    "Exemption",
    "KernelCode",
    "inspect_kernels",
    "loop_iterations",
    "verify_cpu_kernels",
    "verify_cpu_kernels_pass",
]

_LOG = logging.getLogger(__name__)

#: A kernel none of whose loop nests runs more iterations than this (static
#: extents) is fine serial and scalar: a parallel launch or a vector loop gains
#: nothing (``schedule_cpu.needs_schedule`` leaves such kernels to no rule).
TINY_ITERATIONS = 64

#: Kernels with at most this many loop iterations (static) need no parallel loop:
#: a launch on the thread pool costs more than the work (a single-row RMSNorm of
#: 1,024 elements, say).
PARALLEL_MIN_ITERATIONS = 1 << 14

#: TVM's own paged-KV-cache CPU kernels (``tvm.relax.frontend.nn.llm``), which
#: TVM writes serial: decode attention, its sliding-window variant, the page
#: copies and the attention-state merge come marked scheduled; the paged prefill
#: and tree-attention ones are in ``schedule_cpu.KV_CACHE_SERIAL``.  Attention
#: over cached pages therefore runs on one core (docs/cpu-speed.md).  The ragged
#: prefill (a prompt attending to itself) is ours on CPU builds
#: (``kernels/cpu_prefill_attention.py``) and is checked like the others.
TVM_KV_CACHE_KERNELS = frozenset(
    {
        "batch_decode_paged_kv_cpu",
        "batch_decode_paged_kv_cpu_sliding_window",
        "batch_prefill_paged_kv_cpu",
        "batch_prefill_paged_kv_cpu_sliding_window",
        "batch_tree_attn",
        "compact_kv_copy_cpu",
        "copy_single_page_cpu",
        "merge_state_inplace_cpu",
        "tree_attn_paged_kv_cpu",
    }
)


@dataclasses.dataclass(frozen=True)
class KernelCode:
    """What a kernel's lowered code does: vector accesses, a parallel loop."""

    name: str
    vector_accesses: int
    parallel: bool
    iterations: int | None  # static loop iterations of its largest nest; None: symbolic

    @property
    def tiny(self) -> bool:
        """At most ``schedule_cpu.TINY_ITERATIONS`` iterations: fine scalar and serial."""
        return self.iterations is not None and self.iterations <= TINY_ITERATIONS

    @property
    def needs_parallel(self) -> bool:
        return self.iterations is None or self.iterations > PARALLEL_MIN_ITERATIONS

    def missing(self) -> list[str]:
        """What the kernel lacks: ``"vector"``, ``"parallel"`` (empty: nothing)."""
        out = []
        if self.vector_accesses == 0 and not self.tiny:
            out.append("vector")
        if self.needs_parallel and not self.parallel:
            out.append("parallel")
        return out


@dataclasses.dataclass(frozen=True)
class Exemption:
    """Kernels allowed to lack ``waives`` (``"vector"``, ``"parallel"``), for ``reason``.

    ``applies(name, func)`` picks them, by what they are (not by a numbered
    name, which changes with the model).
    """

    reason: str
    waives: frozenset[str]
    applies: Callable[[str, tirx.PrimFunc], bool]


def _has_var(func: tirx.PrimFunc, var_name: str) -> bool:
    """Whether ``func`` uses a variable named ``var_name`` (a symbolic extent)."""
    names = set()
    tvm_ffi.structural_walk(func, [(tirx.Var, lambda v: names.add(v.name))], order="post")
    return var_name in names


def _vision_symbolic(name: str, func: tirx.PrimFunc) -> bool:
    return _has_var(func, "image_patches") and name.startswith(
        ("softmax", "transpose", "fused_split")
    )


#: The kernels allowed to stay partly scalar, each with its reason.
EXEMPTIONS: tuple[Exemption, ...] = (
    Exemption(
        "vision tower: the vector axis is the symbolic patch count (the attention softmax "
        "over keys, the K transpose) or a rotate-half concatenation that TVM's VectorizeLoop "
        "scalarises (the 2-D RoPE); rows run in parallel, elements serially. Measured cost: "
        "the softmax is ~0.6 s of a 2.7 s 448x448 encode at 0.8B (docs/vision.md)",
        frozenset({"vector"}),
        _vision_symbolic,
    ),
)


def _lower(mod: tvm.IRModule, target: Target) -> tvm.IRModule:
    """``mod``'s PrimFuncs lowered through ``s_tir`` up to and including VectorizeLoop."""
    passes = [
        s_tir.transform.CanonicalizeLoop(),
        s_tir.transform.LowerCrossThreadReduction(),
        s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.CompactBufferAllocation(),
        s_tir.transform.LowerMatchBuffer(),
        s_tir.transform.StmtSimplify(),
        s_tir.transform.LowerOpaqueBlock(),
        tirx.transform.FlattenBuffer(),
        tirx.transform.NarrowDataType(32),
        s_tir.transform.LoopPartition(),
        tirx.transform.VectorizeLoop(True),
    ]
    with target:
        return tvm.transform.Sequential(passes)(mod)


def loop_iterations(stmt: tirx.Stmt) -> int | None:
    """Static iterations of the largest loop nest of ``stmt`` (None: a symbolic extent)."""
    loops = []
    tvm_ffi.structural_walk(stmt, [(tirx.For, loops.append)], order="post")
    nest = {}
    for loop in loops:  # inner loops come first
        if not isinstance(loop.extent, tirx.IntImm):
            return None
        inner = []
        tvm_ffi.structural_walk(loop.body, [(tirx.For, inner.append)], order="post")
        nest[loop] = int(loop.extent) * max((nest[i] for i in inner), default=1)
    return max(nest.values(), default=1)


def _code(name: str, func: tirx.PrimFunc, before: tirx.PrimFunc) -> KernelCode:
    ramps, parallel = [0], [False]

    def on_ramp(_ramp):
        ramps[0] += 1

    def on_for(loop):
        if loop.kind == tirx.ForKind.PARALLEL:
            parallel[0] = True

    tvm_ffi.structural_walk(func.body, [(tirx.Ramp, on_ramp), (tirx.For, on_for)], order="post")
    return KernelCode(name, ramps[0], parallel[0], loop_iterations(before.body))


def _checked(mod: tvm.IRModule) -> dict[str, tirx.PrimFunc]:
    """The scheduled kernels of ``mod`` the check covers, by name.

    A matmul with a run-time switch between its GEMV and GEMM schedules (the
    root block's body is an ``if``) counts as two kernels, ``name[gemv]`` and
    ``name[gemm]``: each branch must lower to parallel vector code, not just one.
    """
    out = {}
    for gvar, func in mod.functions_items():
        name = gvar.name_hint
        if (
            isinstance(func, tirx.PrimFunc)
            and func.attrs is not None
            and bool(func.attrs.get("tirx.is_scheduled", False))
            and name not in TVM_KV_CACHE_KERNELS
        ):
            out.update(_branches(name, func))
    return out


def _branches(name: str, func: tirx.PrimFunc) -> dict[str, tirx.PrimFunc]:
    """``{name: func}``, or one function per branch of a GEMV/GEMM switch."""
    realize = func.body
    if not isinstance(realize, s_tir.SBlockRealize):
        return {name: func}
    root = realize.block
    switch = root.body
    if not isinstance(switch, tirx.IfThenElse) or switch.else_case is None:
        return {name: func}

    def branch(body):
        block = s_tir.SBlock(
            iter_vars=[],
            reads=[],
            writes=[],
            name_hint=root.name_hint,
            body=body,
            alloc_buffers=root.alloc_buffers,
        )
        return func.with_body(s_tir.SBlockRealize([], True, block))

    return {f"{name}[gemv]": branch(switch.then_case), f"{name}[gemm]": branch(switch.else_case)}


def inspect_kernels(mod: tvm.IRModule, target: Target) -> dict[str, KernelCode]:
    """:class:`KernelCode` of every scheduled kernel of ``mod`` the check covers."""
    kernels = _checked(mod)
    if not kernels:
        return {}
    symbols = {_symbol(n): n for n in kernels}
    lowered = _lower(
        tvm.IRModule({s: kernels[n].with_attr("global_symbol", s) for s, n in symbols.items()}),
        target,
    )
    out = {}
    for gvar, func in lowered.functions_items():
        name = symbols[gvar.name_hint]
        out[name] = _code(name, func, kernels[name])
    return out


def _symbol(name: str) -> str:
    """A function name for ``name`` (``x[gemv]`` -> ``x__gemv``)."""
    return name.replace("[", "__").replace("]", "")


def verify_cpu_kernels(
    mod: tvm.IRModule, target: Target, exemptions: Iterable[Exemption] = EXEMPTIONS
) -> tvm.IRModule:
    """``mod`` unchanged, or :class:`UnscheduledKernelError` naming every scheduled
    kernel whose lowered code is not vectorised or not parallel (module docstring)."""
    exemptions = list(exemptions)
    kernels = _checked(mod)
    failures = []
    for name, code in sorted(inspect_kernels(mod, target).items()):
        missing = set(code.missing())
        for exemption in exemptions:
            if missing & exemption.waives and exemption.applies(name, kernels[name]):
                _LOG.debug("%s: %s waived (%s)", name, missing & exemption.waives, exemption.reason)
                missing -= exemption.waives
        if missing:
            failures.append(f"{name} ({' and '.join(sorted(missing, reverse=True))})")
    if failures:
        raise UnscheduledKernelError(
            f"{len(failures)} scheduled CPU kernel(s) lower to serial or scalar code on "
            f"{target.attrs.get('mtriple', '') or 'the host'} "
            f"{target.attrs.get('mcpu', '')}".rstrip()
            + f": {', '.join(failures)}; a rule claimed them but the code is not what it "
            "promises (compile/cpu_check.py)"
        )
    return mod


def verify_cpu_kernels_pass(target: Target) -> tvm.transform.Pass:
    """A module pass running :func:`verify_cpu_kernels` with ``target``."""

    @tvm.transform.module_pass(opt_level=0, name="VerifyCPUKernels")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return verify_cpu_kernels(mod, target)

    return _pass
