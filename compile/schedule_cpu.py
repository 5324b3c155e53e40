"""CPU schedules for the model's TIR functions, and the Relax pipeline that applies them.

TVM's default CPU build leaves every TIR function as a serial scalar loop nest.
This module schedules the functions that legalization and fusion produce with a
list of rules (:func:`cpu_rules`), applied the way the GPU pipeline applies
dlight's: each rule's ``apply(func, target)`` returns the scheduled function,
or None when the function is not of its kind; :func:`schedule_for_cpu` tries
them in order on every PrimFunc and the first that answers wins.  A new
schedule is one rule appended to the list.  The rules:

* :class:`Matmul` -- matmuls (``C[s, i, j] = sum_k A[s, i, k] * B[s, j, k]``,
  any layout of B, input casts and elementwise epilogues fused in) get two
  schedules, picked at run time on the number of rows ``M`` (``seq_len`` in
  prefill, ``batch`` in decode):

  - GEMM (``M >= GEMV_MAX_ROWS``): parallel over panels of ``NR`` columns of B,
    each panel packed (in B's dtype) into a ``[K, NR]`` buffer, then
    ``MR x NR`` register tiles accumulated in fp32 with vector FMAs over K
    (fp16 converted as it is loaded); rows are padded to a multiple of ``MR``
    so the inner loop carries no guard.
  - GEMV (small ``M``): parallel over groups of output columns, each a dot
    product over K with one vector accumulator per column (B K-contiguous), or
    a vector of columns accumulated along K (B N-contiguous).

* :class:`Reduction` -- reductions (RMSNorm sums, L2 norms): parallel over
  rows, the reduction vectorised through an ``rfactor`` over vector lanes, the
  fused elementwise blocks computed per row and vectorised.
* :class:`Elementwise` -- elementwise / injective functions: parallel outer
  loop, vectorised inner loop.
* :class:`Serial` -- named kernels that stay as they are, each with its reason
  (TVM's paged-KV-cache prefill and tree attention kernels).

A rule says "not mine" only by returning None (the rules here raise
``_NoMatch`` internally, which counts the same); any other exception is a bug
and fails the build naming the rule and the kernel.  Functions already
scheduled (attr ``tirx.is_scheduled``: the hand-written kernels, TVM's
pre-scheduled KV-cache kernels) and reshapes (views after
``RewriteDataflowReshape``) are not offered to the rules.  A function that no
rule takes and that :func:`needs_schedule` is a build error
(:class:`UnscheduledKernelError`) naming every such kernel, instead of a
kernel silently left serial.

Use :func:`cpu_pipeline` as ``relax_pipeline`` of ``tvm.compile`` and
:func:`cpu_target` for the target (it resolves ``mcpu: native``, which TVM
0.27's LLVM silently replaces by ``generic``).  At run time TVM's thread pool
uses half the hardware threads on x86 (1 on a 2-vCPU machine) unless
``TVM_NUM_THREADS`` is set before the first parallel call.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterable

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx
from tvm.relax.backend.cpu_generic import pipeline as _CPU_PASSES
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.gpu.matmul import IterKind, make_iter_fusion_index_map
from tvm.target import Target
from tvm.target.codegen import (
    llvm_cpu_has_features,
    llvm_get_system_cpu,
    llvm_get_system_triple,
    llvm_get_vector_width,
)
from tvm.tirx.analysis import undefined_vars

from .cpu_check import TINY_ITERATIONS, loop_iterations, verify_cpu_kernels_pass
from .quantization import GROUP_SIZE
from .schedule_gpu import UnscheduledKernelError

__all__ = [
    "GEMV_MAX_ROWS",
    "KV_CACHE_SERIAL",
    "TINY_ITERATIONS",
    "CPURule",
    "Elementwise",
    "Matmul",
    "Reduction",
    "ScheduleRuleError",
    "Serial",
    "UnscheduledKernelError",
    "cpu_pipeline",
    "cpu_rules",
    "cpu_target",
    "needs_schedule",
    "schedule_for_cpu",
    "schedule_for_cpu_pass",
]

#: Matmuls with fewer rows than this run the GEMV schedule, others the GEMM one.
#: The GEMM packs every weight panel on each call (about 0.6 ms for a
#: 1024 x 3584 weight with 2 threads), which the GEMV does not; measured at the
#: Qwen3.5-0.8B MLP shapes the GEMV is as fast or faster up to 16 rows.
GEMV_MAX_ROWS = 16

#: Output columns one GEMV task accumulates together (one vector register each).
_GEMV_COLUMNS = 8

_SCHEDULED = "tirx.is_scheduled"
_LOG = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# Target and pipeline
# --------------------------------------------------------------------------
def cpu_target(target: Target | dict | str) -> Target:
    """The target with ``mcpu: native`` replaced by the host's CPU name.

    TVM 0.27's LLVM (triple ``x86_64-conda-linux-gnu``) refuses ``native`` and
    falls back to ``generic`` (no AVX at all), so code built for "native" runs
    at SSE2 speed.  Other targets are returned unchanged.
    """
    target = target if isinstance(target, Target) else Target(target)
    if target.kind.name != "llvm" or str(target.attrs.get("mcpu", "")) != "native":
        return target
    return Target({**dict(target.export()), "mcpu": llvm_get_system_cpu()})


def schedule_for_cpu_pass(
    target: Target, rules: Iterable[CPURule] | None = None
) -> tvm.transform.Pass:
    """A module pass running :func:`schedule_for_cpu` with ``target`` (and ``rules``)."""

    @tvm.transform.module_pass(opt_level=0, name="ScheduleForCPU")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return schedule_for_cpu(mod, target, rules)

    return _pass


def cpu_pipeline(target: Target, rules: Iterable[CPURule] | None = None) -> tvm.transform.Pass:
    """TVM's CPU Relax pipeline with fusion and :func:`schedule_for_cpu`.

    ``tvm.compile``'s ``"default"`` pipeline for llvm neither fuses nor
    schedules.  This one runs: library dispatch, ``FuseTransposeMatmul`` (so
    ``x @ W.T`` reads W in place instead of transposing it on every call),
    legalization and fusion, the CPU schedules (``rules``, by default
    :func:`cpu_rules`), the check that the scheduled kernels lower to parallel
    vector code (``compile/cpu_check.py``), then the default dataflow lowering and finalization
    passes of ``relax.backend.cpu_generic`` (taken from its ``pipeline``
    module: TVM 0.27's package does not export ``dataflow_lower_passes``, so
    ``relax.pipeline.dataflow_lower_passes`` fails for llvm).
    """
    rules = None if rules is None else list(rules)

    @tvm.transform.module_pass(opt_level=0, name="CPURelaxPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                _CPU_PASSES.library_dispatch_passes(target)
                + [relax.transform.FuseTransposeMatmul()]
                + _CPU_PASSES.legalize_passes(target)
                + [schedule_for_cpu_pass(target, rules), verify_cpu_kernels_pass(target)]
                + _CPU_PASSES.dataflow_lower_passes(target)
                + _CPU_PASSES.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


# --------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------
@tvm_ffi.register_error
class ScheduleRuleError(RuntimeError):
    """A rule failed (raised) on a kernel: a bug in the rule, never "not mine"."""


# Errors raised inside a pass cross TVM's FFI on their way out of ``tvm.compile``,
# which keeps the message but turns unregistered types into RuntimeError: registered,
# the build fails with the type raised here (a UserError for the command line).
tvm_ffi.register_error(UnscheduledKernelError)


class _NoMatch(Exception):
    """Raised inside a rule when the function is not of its kind (same as returning None)."""


class CPURule:
    """A CPU schedule: ``apply(func, target)`` returns ``func`` scheduled, or None
    when ``func`` is not of its kind.

    Returning ``func`` itself accepts it as it is (nothing changes, and it is
    not marked scheduled).  ``kernels``, when set, limits the rule to the
    kernels (global names) it lists.
    """

    kernels: frozenset[str] | None = None

    def apply(self, func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return type(self).__name__


class Matmul(CPURule):
    """GEMM and GEMV schedules of a matmul, chosen at run time on the row count."""

    def apply(self, func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
        return _unless_no_match(_schedule_matmul, func, target)


class Reduction(CPURule):
    """One row reduction (innermost axes reduced), with fused elementwise blocks."""

    def apply(self, func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
        return _unless_no_match(_schedule_reduction, func, target)


class RowReductions(CPURule):
    """Several reductions over the same rows, with elementwise blocks between
    them (softmax: max, exp, sum, divide; LayerNorm: mean, variance, normalise)."""

    def apply(self, func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
        return _unless_no_match(_schedule_row_reductions, func, target)


class Elementwise(CPURule):
    """Spatial-only functions: parallel outer loop, vectorised inner loop."""

    def apply(self, func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
        return _unless_no_match(_schedule_elementwise, func, target)


def _unless_no_match(schedule, func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
    """``schedule(func, target)``, or None where it raises _NoMatch."""
    try:
        return schedule(func, target)
    except _NoMatch:
        return None


class Serial(CPURule):
    """The named ``kernels`` stay as they are (serial), for ``reason``."""

    def __init__(self, reason: str, kernels: Iterable[str]):
        self.reason = reason
        self.kernels = frozenset(kernels)

    def apply(self, func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc | None:
        return func

    def __repr__(self) -> str:
        return f"Serial({', '.join(sorted(self.kernels))})"


#: TVM's paged-KV-cache CPU kernels that TVM ships unscheduled
#: (``tvm.relax.frontend.nn.llm``: ``_attention_prefill_cpu``,
#: ``_attention_prefill_ragged_cpu``, ``tree_attn_cpu``,
#: ``tree_attn_with_paged_kv_cache_cpu``); its decode, merge and copy kernels
#: come marked scheduled.
KV_CACHE_SERIAL = Serial(
    "TVM's own paged-KV-cache CPU attention kernels (prefill, ragged prefill, tree attention): "
    "opaque blocks whose loops run over page tables and ragged index pointers, which none of "
    "the rules can restructure; TVM ships them serial and the model runs them as TVM wrote "
    "them (tree attention serves speculative-decoding token trees, which the runtime does not "
    "use; prefill attention on one core is a known performance limit, not a correctness issue)",
    (
        "batch_prefill_paged_kv_cpu",
        "batch_prefill_paged_kv_cpu_sliding_window",
        "batch_prefill_ragged_kv",
        "batch_tree_attn",
        "tree_attn_paged_kv_cpu",
    ),
)


def cpu_rules(target: Target | None = None) -> list[CPURule]:
    """The CPU rules, most specific first (``target``: for rules that depend on it)."""
    del target  # the same rules for every CPU today
    return [Matmul(), Reduction(), RowReductions(), Elementwise(), KV_CACHE_SERIAL]


# --------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------
def schedule_for_cpu(
    mod: tvm.IRModule, target: Target | dict | str, rules: Iterable[CPURule] | None = None
) -> tvm.IRModule:
    """Schedule every unscheduled TIR function of ``mod`` for the CPU ``target``.

    Run after ``LegalizeOps``/``FuseOps``/``FuseTIR``.  Each function gets the
    first of ``rules`` (default :func:`cpu_rules`) that applies; functions a
    rule changed are marked ``tirx.is_scheduled``.  A rule that raises fails
    with :class:`ScheduleRuleError` naming the kernel; functions no rule takes
    that :func:`needs_schedule` fail with :class:`UnscheduledKernelError`
    naming them all.
    """
    target = target if isinstance(target, Target) else Target(target)
    rules = cpu_rules(target) if rules is None else list(rules)
    updates, missing = {}, []
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func) or _is_reshape(func):
            continue  # reshapes: RewriteDataflowReshape turns them into free views
        name = gvar.name_hint
        rule, scheduled = _apply_rules(rules, name, func, target)
        if scheduled is None:
            if needs_schedule(func):
                missing.append(name)
            continue
        _LOG.debug("%s: %r", name, rule)
        if not scheduled.same_as(func):
            updates[gvar] = scheduled.with_attr(_SCHEDULED, True)
    if missing:
        missing.sort()
        raise UnscheduledKernelError(
            f"{len(missing)} CPU kernel(s) have no schedule, they would run serially on one "
            f"core: {', '.join(missing)}; add a rule to cpu_rules() (compile/schedule_cpu.py), "
            "or list the kernel in a Serial rule with the reason it is fine serial"
        )
    if not updates:
        return mod
    mod = mod.clone()
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod


def _apply_rules(rules: list[CPURule], name: str, func: tirx.PrimFunc, target: Target):
    """(rule, result) of the first rule that applies to kernel ``name``, else (None, None)."""
    for rule in rules:
        if rule.kernels is not None and name not in rule.kernels:
            continue
        try:
            scheduled = rule.apply(func, target)
        except _NoMatch:
            scheduled = None
        except Exception as err:
            # The message says it all: the FFI drops __cause__ on the way out of a build.
            lines = [line for line in str(err).splitlines() if line.strip()]
            detail = lines[-1].strip()[:300] if lines else ""
            frame = traceback.extract_tb(err.__traceback__)[-1]
            raise ScheduleRuleError(
                f"CPU schedule rule {rule!r} failed on kernel '{name}': "
                f"{type(err).__name__}: {detail} (raised at {frame.filename}:{frame.lineno})"
            ) from err
        if scheduled is None:
            continue
        if not isinstance(scheduled, tirx.PrimFunc):
            raise ScheduleRuleError(
                f"CPU schedule rule {rule!r} returned {type(scheduled).__name__} for kernel "
                f"'{name}', not a PrimFunc or None"
            )
        return rule, scheduled
    return None, None


def needs_schedule(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` would be a slow kernel if no rule scheduled it.

    Everything with loops needs one, except: functions marked
    ``tirx.is_scheduled`` (the hand-written kernels, TVM's pre-scheduled
    KV-cache kernels), host functions (``tirx.is_host_func``), reshapes
    (``RewriteDataflowReshape`` turns them into views), and tiny functions:
    every loop nest with static extents and at most :data:`TINY_ITERATIONS`
    iterations (a function without loops is scalar).
    """
    if _is_scheduled(func) or _attr(func, "tirx.is_host_func") or _is_reshape(func):
        return False
    iterations = loop_iterations(func.body)
    return iterations is None or iterations > TINY_ITERATIONS


def _attr(func: tirx.PrimFunc, key: str) -> bool:
    return func.attrs is not None and bool(func.attrs.get(key, False))


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return _attr(func, _SCHEDULED)


def _is_reshape(func: tirx.PrimFunc) -> bool:
    """A reshape (TVM's analysis only reads functions with a root block)."""
    return isinstance(func.body, s_tir.SBlockRealize) and relax.analysis.has_reshape_pattern(func)


# --------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------
def vector_bits(target: Target) -> int:
    """The width of ``target``'s vector registers, from its features.

    x86: 512 with AVX-512F, 256 with AVX, else 128.  TVM 0.27's
    ``llvm_get_vector_width`` answers for the machine that builds (512 here
    for ``mcpu=haswell`` too), so an AVX2 build made on an AVX-512 machine got
    16-lane schedules; the features answer for the target.  Other CPUs (aarch64
    NEON): what LLVM says, at least 128.
    """
    triple = str(target.attrs.get("mtriple", "")) or llvm_get_system_triple()
    if triple.startswith(("x86_64", "i386", "i686")):
        if llvm_cpu_has_features("avx512f", target):
            return 512
        return 256 if llvm_cpu_has_features("avx", target) else 128
    width = llvm_get_vector_width(target)
    return max(width, 128)


def _lanes(target: Target, bits: int = 32) -> int:
    """Vector lanes of ``bits``-wide elements in one register of ``target``."""
    return max(vector_bits(target) // bits, 4)


def _const(expr) -> int | None:
    """The value of a constant extent (an IntImm, or a plain int as dlight gives it)."""
    if isinstance(expr, int):
        return expr
    return int(expr) if isinstance(expr, tirx.IntImm) else None


def _same_extent(a, b) -> bool:
    if _const(a) is not None or _const(b) is not None:
        return _const(a) == _const(b)
    return tvm_ffi.structural_equal(a, b)


def _extent(sch: s_tir.Schedule, loop) -> tirx.PrimExpr:
    return sch.get(loop).extent


def _blocks(sch: s_tir.Schedule) -> list:
    """Block infos of a function in normal form (no opaque blocks), else _NoMatch."""
    infos = normalize_prim_func(sch)
    if infos is None:
        raise _NoMatch
    return infos


def _is_reduction(sch: s_tir.Schedule, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _inline_producers(sch: s_tir.Schedule, block) -> None:
    """Inline every spatial producer (casts, reindex copies) of ``block``, transitively."""
    changed = True
    while changed:
        changed = False
        for producer in sch.get_producers(block):
            if _is_reduction(sch, producer):
                continue
            _inline_producers(sch, producer)
            try:
                sch.compute_inline(producer)
                changed = True
            except s_tir.ScheduleError:
                pass


def _inline_spatial(sch: s_tir.Schedule, infos: list) -> None:
    """Inline every spatial block that is not an output into its consumers."""
    for info in infos:
        if info.is_injective():
            try:
                sch.compute_inline(info.block_rv)
            except s_tir.ScheduleError:
                pass


def _inline_consumers(sch: s_tir.Schedule, block) -> list:
    """Inline the consumer chain of ``block`` into it; return the consumers left."""
    changed = True
    while changed:
        changed = False
        for consumer in sch.get_consumers(block):
            for inline in (sch.compute_inline, sch.reverse_compute_inline):
                try:
                    inline(consumer)
                    changed = True
                    break
                except s_tir.ScheduleError:
                    continue
    return list(sch.get_consumers(block))


def _vectorize_inner(sch: s_tir.Schedule, loop, lanes: int) -> None:
    """Vectorise ``loop`` by ``lanes`` when its extent is a constant multiple (or below)."""
    extent = _const(_extent(sch, loop))
    if extent is None or extent < 2:
        return
    if extent <= lanes:
        sch.vectorize(loop)
    elif extent % lanes == 0:
        _, inner = sch.split(loop, [None, lanes])
        sch.vectorize(inner)


def _parallel_vectorize(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Spatial block: fuse its outer loops into one parallel loop, vectorise the last."""
    loops = sch.get_loops(block)
    if len(loops) > 1:
        sch.parallel(sch.fuse(*loops[:-1]))
        _vectorize_inner(sch, loops[-1], lanes)
    elif loops:
        extent = _const(_extent(sch, loops[0]))
        if extent is not None and extent % lanes == 0 and extent >= lanes:
            outer, inner = sch.split(loops[0], [None, lanes])
            sch.parallel(outer)
            sch.vectorize(inner)
        else:
            sch.parallel(loops[0])


# --------------------------------------------------------------------------
# Matmul
# --------------------------------------------------------------------------
def _schedule_matmul(func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc:
    """GEMM and GEMV schedules, chosen at run time on the row count."""
    sch = s_tir.Schedule(func)
    infos = _blocks(sch)
    reductions = [b for b in infos if not b.is_injective()]
    if len(reductions) != 1 or _index_maps(sch.get(reductions[0].block_rv)) is None:
        raise _NoMatch
    name = sch.get(reductions[0].block_rv).name_hint
    rows = _normalized_rows(func, name)
    nrows = _const(rows)
    if nrows is not None:
        return _gemv(func, name, target) if nrows < GEMV_MAX_ROWS else _gemm(func, name, target)
    gemv = _gemv(func, name, target)
    gemm = _gemm(func, name, target)
    return _dispatch(func, rows < GEMV_MAX_ROWS, gemv, gemm)


def _index_maps(block) -> tuple | None:
    """Index maps rewriting a matmul block as ``C[S, I, J] += A[S, I, K] * B[S, J, K]``.

    Like dlight's ``get_index_map`` (block, A, B and C maps), except that the
    row axis I may be absent (a one-row GEMV with static shapes): it is then
    the constant 0.  None when the block is not a matmul.
    """
    if len(block.reads) != 2 or len(block.writes) != 1:
        return None
    axes = []
    for region in (block.reads[0], block.reads[1], block.writes[0]):
        if any(
            not (isinstance(r.extent, tirx.IntImm) and r.extent.value == 1) for r in region.region
        ):
            return None
        axes.append({v for r in region.region for v in undefined_vars(r.min)})
    a_axes, b_axes, c_axes = axes
    kinds = {}
    for iv in block.iter_vars:
        var, extent = iv.var, iv.dom.extent
        if isinstance(extent, tirx.IntImm) and extent.value == 1:
            kinds[var] = IterKind.kIter_T
        elif iv.iter_type == tirx.IterVar.DataPar and var in b_axes and var in c_axes:
            kinds[var] = IterKind.kIter_S if var in a_axes else IterKind.kIter_J
        elif iv.iter_type == tirx.IterVar.DataPar and var in a_axes and var in c_axes:
            kinds[var] = IterKind.kIter_I
        elif (
            iv.iter_type == tirx.IterVar.CommReduce
            and var in a_axes
            and var in b_axes
            and var not in c_axes
        ):
            kinds[var] = IterKind.kIter_K
        else:
            return None
    if not {IterKind.kIter_J, IterKind.kIter_K} <= set(kinds.values()):
        return None

    def fusion(used: set, order: list):
        traits = [_Trait(kinds[iv.var], iv.dom.extent) for iv in block.iter_vars if iv.var in used]
        return make_iter_fusion_index_map(traits, order)

    s_, i_, j_, k_ = IterKind.kIter_S, IterKind.kIter_I, IterKind.kIter_J, IterKind.kIter_K
    every = {iv.var for iv in block.iter_vars}
    return (
        fusion(every, [s_, i_, j_, k_]),
        fusion(a_axes, [s_, i_, k_]),
        fusion(b_axes, [s_, j_, k_]),
        fusion(c_axes, [s_, i_, j_]),
    )


class _Trait:  # pylint: disable=too-few-public-methods
    """An iterator's kind and extent, as ``make_iter_fusion_index_map`` reads them."""

    def __init__(self, kind: IterKind, extent: tirx.PrimExpr):
        self.kind, self.extent = kind, extent


def _normalize(sch: s_tir.Schedule, name: str):
    """Rewrite the matmul block as ``C[S, I, J] += A[S, I, K] * B[S, J, K]``.

    Returns the block and the reindex copy blocks of A, B and C.
    """
    main = sch.get_sblock(name)
    read_a = sch.reindex(main, ("read", 0))
    read_b = sch.reindex(main, ("read", 1))
    write_c = sch.reindex(main, ("write", 0))
    block_map, a_map, b_map, c_map = _index_maps(sch.get(main))
    sch.transform_layout(read_a, ("write", 0), a_map)
    sch.transform_layout(read_b, ("write", 0), b_map)
    sch.transform_layout(write_c, ("read", 0), c_map)
    sch.transform_block_layout(main, block_map)
    return main, read_a, read_b, write_c


def _normalized_rows(func: tirx.PrimFunc, name: str) -> tirx.PrimExpr:
    """The extent of the fused row axis I of the matmul block ``name``."""
    sch = s_tir.Schedule(func)
    main, *_ = _normalize(sch, name)
    return sch.get(main).iter_vars[1].dom.extent


def _b_is_k_contiguous(func: tirx.PrimFunc, name: str) -> bool:
    """Whether B's innermost index is the reduction axis (``x @ W.T`` layout)."""
    sch = s_tir.Schedule(func)
    block = sch.get(sch.get_sblock(name))
    reduce_vars = {iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce}
    last = block.reads[1].region[-1].min
    return isinstance(last, tirx.Var) and any(last.same_as(v) for v in reduce_vars)


def _operand_block(sch: s_tir.Schedule, main, index: int):
    """The producer block writing the ``index``-th buffer read by ``main``."""
    buffer = sch.get(main).reads[index].source
    for producer in sch.get_producers(main):
        if sch.get(producer).writes[0].source.same_as(buffer):
            return producer
    raise _NoMatch


def _finish_output(sch: s_tir.Schedule, main, at, lanes: int) -> None:
    """Accumulate ``main`` in a local buffer written back (with the fused epilogue) at ``at``."""
    local = sch.cache_write(main, 0, "local")
    sch.reverse_compute_at(local, at, preserve_unit_loops=True)
    for consumer in _inline_consumers(sch, local):
        _parallel_vectorize(sch, consumer, lanes)
    _vectorize_inner(sch, sch.get_loops(local)[-1], lanes)


def _gemm(func: tirx.PrimFunc, name: str, target: Target) -> tirx.PrimFunc:
    """Packed-panel register-tiled GEMM (see the module docstring)."""
    lanes = _lanes(target)
    nr = 2 * lanes  # two vector registers of columns
    mr = 8 if lanes >= 16 or "aarch64" in str(target.attrs.get("mtriple", "")) else 6
    sch = s_tir.Schedule(func)
    _normalize(sch, name)
    sch = s_tir.Schedule(_widen_operands(sch.mod["main"], name))
    main = sch.get_sblock(name)
    _, rows, cols, _ = (iv.dom.extent for iv in sch.get(main).iter_vars)
    ncols = _const(cols)
    pad = [1, 1 if _const(rows) is not None and _const(rows) % mr == 0 else mr, 1, 1]
    if ncols is None or ncols % nr != 0:
        if ncols is not None and ncols % lanes == 0:
            nr = lanes
        else:
            pad[2] = nr
    if pad != [1, 1, 1, 1]:
        sch.pad_einsum(main, pad)

    s, i, j, k = sch.get_loops(main)
    i_outer, i_inner = sch.split(i, [None, mr])
    j_outer, j_inner = sch.split(j, [None, nr])
    j_vec_outer, j_vec = sch.split(j_inner, [None, lanes])
    sch.reorder(s, j_outer, i_outer, k, i_inner, j_vec_outer, j_vec)
    panel = sch.fuse(s, j_outer)
    sch.parallel(panel)
    sch.unroll(i_inner)
    sch.unroll(j_vec_outer)
    sch.vectorize(j_vec)

    # B: one [K, NR] panel per parallel iteration, written row by row.
    pack = _operand_block(sch, main, 1)
    _inline_producers(sch, pack)
    sch.compute_at(pack, panel, preserve_unit_loops=True)
    sch.transform_layout(pack, ("write", 0), lambda s_, j_, k_: (s_, j_ // nr, k_, j_ % nr))
    pack_loops = sch.get_loops(pack)
    sch.reorder(pack_loops[-1], pack_loops[-2])

    # A: read in place, or through its zero-padded copy when rows were padded.
    a_block = _operand_block(sch, main, 0)
    _inline_producers(sch, a_block)
    if pad[1] == 1:
        sch.compute_inline(a_block)
    else:
        _parallel_vectorize(sch, a_block, lanes)
    _finish_output(sch, main, i_outer, lanes)
    sch.decompose_reduction(main, k)
    return sch.mod["main"]


def _widen_operands(func: tirx.PrimFunc, name: str) -> tirx.PrimFunc:
    """Re-type the reindex copies of A and B to the fp32 accumulator's dtype.

    The matmul block reads them only as ``Cast("float32", X[...])``, so the
    cast moves into the copy: the GEMM packs B (and pads A) straight to fp32,
    its inner loop loads fp32, and LLVM does not copy fp16 scalars through a
    chain of ``vpinsrw`` (slow) when packing.
    """
    sch = s_tir.Schedule(func)
    block = sch.get(sch.get_sblock(name))
    acc = block.writes[0].source.dtype
    if acc != "float32":
        return func
    for region in block.reads[:2]:
        buffer = region.source
        if buffer.dtype != acc and _read_only_as(block.body, buffer, acc):
            func = _retype(func, buffer, acc)
    return func


def _read_only_as(body: tirx.Stmt, buffer, dtype: str) -> bool:
    """Whether every load of ``buffer`` in ``body`` is wrapped in ``Cast(dtype, ...)``."""
    loads, casts = [], []

    def on_load(load):
        if load.source.same_as(buffer):
            loads.append(load)

    def on_cast(cast):
        if (
            cast.ty.dtype == dtype
            and isinstance(cast.value, tvm.ir.TensorLoad)
            and cast.value.source.same_as(buffer)
        ):
            casts.append(cast)

    tvm_ffi.structural_walk(
        body, [(tvm.ir.TensorLoad, on_load), (tirx.Cast, on_cast)], order="post"
    )
    return bool(loads) and len(loads) == len(casts)


def _retype(func: tirx.PrimFunc, buffer, dtype: str) -> tirx.PrimFunc:
    """``func`` with the intermediate ``buffer`` stored as ``dtype`` (values cast on store)."""
    new = tirx.decl_buffer(buffer.shape, dtype, buffer.name)

    def on_store(store, mutator):
        if not store.buffer.same_as(buffer):
            return mutator.default_mutate(store)
        value = tirx.Cast(dtype, mutator.mutate(store.value))
        return tirx.BufferStore(new, value, [mutator.mutate(i) for i in store.indices])

    def on_load(load, mutator):
        if not load.source.same_as(buffer):
            return mutator.default_mutate(load)
        return tirx.BufferLoad(new, [mutator.mutate(i) for i in load.indices])

    def on_buffer(buf, _mutator):
        return new if buf.same_as(buffer) else buf

    callbacks = [
        (tirx.BufferStore, on_store),
        (tvm.ir.TensorLoad, on_load),
        (tirx.Buffer, on_buffer),
    ]
    return tvm_ffi.structural_mutate(func, callbacks)


def _gemv(func: tirx.PrimFunc, name: str, target: Target) -> tirx.PrimFunc:
    """Few-row matmul: parallel over output columns, vectorised over K or over N."""
    lanes = _lanes(target)
    k_contiguous = _b_is_k_contiguous(func, name)
    sch = s_tir.Schedule(func)
    main, *_ = _normalize(sch, name)
    _inline_producers(sch, main)
    s, i, j, k = sch.get_loops(main)
    ncols, nk = _const(_extent(sch, j)), _const(_extent(sch, k))
    if k_contiguous and nk is not None and nk % lanes == 0:
        # One vector accumulator per output column, NR columns in flight.
        # (At least two groups where there are two columns, so that the parallel
        # loop survives lowering: a loop of one iteration is removed.)
        nr = (
            1
            if ncols is None
            else next(
                n for n in (_GEMV_COLUMNS, 4, 2, 1) if ncols % n == 0 and (ncols >= 2 * n or n == 1)
            )
        )
        k_outer, k_lane = sch.split(k, [None, lanes])
        rf = sch.rfactor(k_lane, 3)
        s, i, j, k_outer, k_lane = sch.get_loops(rf)
        j_outer, j_inner = sch.split(j, [None, nr])
        # The vectors of one quantization group (32 elements) unrolled together per
        # column, so a group's scale is loaded once for them (same summation order:
        # bit-identical; 3-20% faster at the 0.8B shapes, docs/cpu-speed.md).
        unroll = max(1, GROUP_SIZE // lanes)
        if nk % (lanes * unroll) == 0 and unroll > 1:
            k_outer, k_group = sch.split(k_outer, [None, unroll])
            sch.reorder(s, j_outer, i, k_outer, j_inner, k_group, k_lane)
            sch.unroll(k_group)
        else:
            sch.reorder(s, j_outer, i, k_outer, j_inner, k_lane)
        group = sch.fuse(s, j_outer)
        sch.parallel(group)
        sch.unroll(j_inner)
        sch.vectorize(k_lane)
        sch.reverse_compute_at(main, i, preserve_unit_loops=True)
        sch.set_scope(rf, 0, "local")
        _finish_output(sch, main, i, lanes)
        sch.decompose_reduction(rf, k_outer)
    else:
        # A vector of output columns accumulated along K (B N-contiguous).
        # The widest vector group that leaves at least two groups to run in parallel.
        widths = (4 * lanes, 2 * lanes, lanes, lanes // 2, lanes // 4)
        width = 1
        if ncols is not None:
            fits = [w for w in widths if w >= 4 and ncols % w == 0]
            width = next((w for w in fits if ncols >= 2 * w), fits[0] if fits else 1)
        j_outer, j_inner = sch.split(j, [None, width])
        sch.reorder(s, j_outer, i, k, j_inner)
        group = sch.fuse(s, j_outer)
        sch.parallel(group)
        if width > 1:
            sch.vectorize(j_inner)
        _finish_output(sch, main, i, lanes)
        sch.decompose_reduction(main, k)
    return sch.mod["main"]


def _dispatch(
    func: tirx.PrimFunc, cond: tirx.PrimExpr, then_func: tirx.PrimFunc, else_func: tirx.PrimFunc
) -> tirx.PrimFunc:
    """One function running ``then_func``'s body when ``cond`` holds, else ``else_func``'s.

    Both are schedules of ``func``, so they share its parameters.
    """
    for other in (then_func, else_func):
        if len(func.params) != len(other.params) or not all(
            a.same_as(b) for a, b in zip(func.params, other.params, strict=True)
        ):
            raise _NoMatch
    then_root, else_root = then_func.body.block, else_func.body.block
    body = tirx.IfThenElse(cond, then_root.body, else_root.body)
    # Intermediates both schedules kept (an epilogue not inlined) are declared once.
    buffers = list(then_root.alloc_buffers)
    buffers += [b for b in else_root.alloc_buffers if not any(b.same_as(x) for x in buffers)]
    root = s_tir.SBlock(
        iter_vars=[], reads=[], writes=[], name_hint="root", body=body, alloc_buffers=buffers
    )
    return func.with_body(s_tir.SBlockRealize([], True, root))


# --------------------------------------------------------------------------
# Reductions
# --------------------------------------------------------------------------
def _schedule_reduction(func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc:
    """One row reduction (innermost axes reduced), with fused elementwise blocks.

    Rows run in parallel; the reduction is split into vector lanes by an
    ``rfactor`` (one vector accumulator per row, summed across lanes at the
    end); an elementwise consumer (the normalisation of an RMSNorm) computes
    each row right after its reduction, vectorised.
    """
    sch = s_tir.Schedule(func)
    infos = _blocks(sch)
    reductions = [b for b in infos if not b.is_injective()]
    if len(reductions) != 1:
        raise _NoMatch
    kinds = reductions[0].dom_kind()
    n_spatial = len(kinds) - len(kinds.lstrip("S"))
    if n_spatial == 0 or set(kinds[n_spatial:]) != {"R"}:
        raise _NoMatch
    block = reductions[0].block_rv
    spatial_extents = [it.dom for it in reductions[0].iters[:n_spatial]]
    lanes = _lanes(target)
    _inline_spatial(sch, infos)
    consumers = sch.get_consumers(block)
    n_blocks = len(sch.get_child_blocks(sch.get_sblock("root")))
    if len(consumers) > 1 or n_blocks != 1 + len(consumers):
        raise _NoMatch

    n_rows = n_spatial
    if consumers:
        # Rows shared with the consumer: leading loops of equal extent (none for
        # a single row with static shape, which runs serially).
        n_rows = 0
        for loop, extent in zip(sch.get_loops(consumers[0]), spatial_extents, strict=False):
            if not _same_extent(_extent(sch, loop), extent):
                break
            n_rows += 1
        if n_rows == 0 and any(_const(e) != 1 for e in spatial_extents):
            raise _NoMatch

    loops = sch.get_loops(block)
    reduce_loop = sch.fuse(*loops[n_spatial:]) if len(loops) - n_spatial > 1 else loops[n_spatial]
    extent = _const(_extent(sch, reduce_loop))
    rf = None
    if extent is not None and extent % lanes == 0 and extent >= lanes:
        _, lane = sch.split(reduce_loop, [None, lanes])
        rf = sch.rfactor(lane, len(sch.get(block).writes[0].source.shape))

    rows = sch.get_loops(block if rf is None else rf)[:n_rows]
    row = (sch.fuse(*rows) if n_rows > 1 else rows[0]) if rows else None
    if row is not None:
        sch.parallel(row)
    if rf is not None:
        if row is not None:
            sch.reverse_compute_at(block, row, preserve_unit_loops=True)
        *_, reduce_outer, lane = sch.get_loops(rf)
        sch.set_scope(rf, 0, "local")
        sch.vectorize(lane)
        sch.decompose_reduction(rf, reduce_outer)
    if consumers:
        if row is not None:
            sch.reverse_compute_at(consumers[0], row, preserve_unit_loops=True)
        inner = sch.get_loops(consumers[0])[0 if row is None else 1 :]
        if inner:
            _vectorize_inner(sch, sch.fuse(*inner) if len(inner) > 1 else inner[0], lanes)
    return sch.mod["main"]


def _schedule_row_reductions(func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc:
    """Rows in parallel, and inside each row its blocks one after another.

    Every reduction reduces the innermost axes of rows that the output block
    shares as its leading loops; the intermediate per-row values (max, sum,
    mean) stay in the row's iteration, and the output's inner loop is
    vectorised.
    """
    sch = s_tir.Schedule(func)
    infos = _blocks(sch)
    reductions = [b for b in infos if not b.is_injective()]
    if len(reductions) < 2:
        raise _NoMatch
    n_rows = None
    for info in reductions:
        kinds = info.dom_kind()
        n_spatial = len(kinds) - len(kinds.lstrip("S"))
        if n_spatial == 0 or set(kinds[n_spatial:]) != {"R"}:
            raise _NoMatch
        n_rows = n_spatial if n_rows is None else min(n_rows, n_spatial)
    row_extents = [it.dom for it in reductions[0].iters[:n_rows]]
    for info in reductions[1:]:
        if not all(_same_extent(a.dom, b) for a, b in zip(info.iters, row_extents)):
            raise _NoMatch
    _inline_spatial(sch, infos)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    last = blocks[-1]
    if _is_reduction(sch, last):
        raise _NoMatch
    loops = sch.get_loops(last)
    if len(loops) <= n_rows or not all(
        _same_extent(_extent(sch, loop), extent) for loop, extent in zip(loops, row_extents)
    ):
        raise _NoMatch
    row = sch.fuse(*loops[:n_rows]) if n_rows > 1 else loops[0]
    sch.parallel(row)
    for block in reversed(blocks[:-1]):
        sch.compute_at(block, row, preserve_unit_loops=True)
    inner = sch.get_loops(last)[1:]
    _vectorize_inner(sch, sch.fuse(*inner) if len(inner) > 1 else inner[0], _lanes(target))
    return sch.mod["main"]


# --------------------------------------------------------------------------
# Elementwise
# --------------------------------------------------------------------------
def _schedule_elementwise(func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc:
    """Spatial-only functions: inline what can be, parallel + vectorise the rest."""
    sch = s_tir.Schedule(func)
    infos = _blocks(sch)
    if not all(b.is_injective() for b in infos):
        raise _NoMatch
    lanes = _lanes(target)
    _inline_spatial(sch, infos)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        _parallel_vectorize(sch, block, lanes)
    return sch.mod["main"]
