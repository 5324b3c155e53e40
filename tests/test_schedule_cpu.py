"""The CPU schedules: a small decoder-like model compiled with and without them.

The model has what the Qwen3.5 decoder has on the CPU path: an embedding
(take), an RMSNorm computed in fp32, bias-free Linear layers (fp32 weights, or
fp16 weights accumulated in fp32), silu(gate) * up, a residual add and a
head; prefill with a symbolic ``seq_len``, decode with a symbolic ``batch``.
Both builds are compared with numpy.

The rule list (``cpu_rules``): tried in order, first match wins; a rule that
raises fails the build naming the kernel, and so does a kernel no rule takes
(negative controls on a hand-made column sum); the real tiny model schedules
every kernel for host and aarch64 and builds.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax, te
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic_pipeline
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.script import tirx as T

from qwen35_mobile.compile.schedule_cpu import (
    GEMV_MAX_ROWS,
    KV_CACHE_SERIAL,
    TINY_ITERATIONS,
    CPURule,
    Elementwise,
    Matmul,
    Reduction,
    RowReductions,
    ScheduleRuleError,
    Serial,
    UnscheduledKernelError,
    _NoMatch,
    cpu_pipeline,
    cpu_rules,
    cpu_target,
    needs_schedule,
    schedule_for_cpu,
)

HIDDEN, INTER, VOCAB = 64, 96, 72  # VOCAB: not a multiple of the 32-column panel
_PARAM_ORDER = (
    "embed.weight",
    "norm.weight",
    "final_norm.weight",
    "gate.weight",
    "up.weight",
    "down.weight",
    "head.weight",
    "mix",
)
EPS = 1e-6


class _RMSNorm(nn.Module):
    """RMSNorm in fp32: spelled out (a sum, then an elementwise function), or
    with ``op.rms_norm`` (one function: the sum and the normalisation fused)."""

    def __init__(self, hidden: int, dtype: str, fused: bool):
        self.weight = nn.Parameter((hidden,), dtype)
        self.fused = fused

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        xf, weight = x.astype("float32"), self.weight.astype("float32")
        if self.fused:
            return op.rms_norm(xf, weight, axes=-1, epsilon=EPS).astype(x.dtype)
        mean_sq = op.sum(xf * xf, axis=-1, keepdims=True) * (1.0 / x.shape[-1])
        return (xf / op.sqrt(mean_sq + EPS) * weight).astype(x.dtype)


class _Tiny(nn.Module):
    def __init__(self, dtype: str):
        self.dtype = dtype
        acc = "float32" if dtype == "float16" else None
        self.embed = nn.Embedding(VOCAB, HIDDEN, dtype=dtype)
        self.norm = _RMSNorm(HIDDEN, dtype, fused=False)
        self.final_norm = _RMSNorm(HIDDEN, dtype, fused=True)
        self.gate = nn.Linear(HIDDEN, INTER, bias=False, dtype=dtype, out_dtype=acc)
        self.up = nn.Linear(HIDDEN, INTER, bias=False, dtype=dtype, out_dtype=acc)
        self.down = nn.Linear(INTER, HIDDEN, bias=False, dtype=dtype, out_dtype=acc)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False, dtype=dtype, out_dtype=acc)
        self.mix = nn.Parameter((HIDDEN, HIDDEN), dtype)  # used as x @ mix: B N-contiguous
        self.acc = acc

    def _linear(self, layer: nn.Linear, x: nn.Tensor) -> nn.Tensor:
        return layer(x).astype(self.dtype)

    def _body(self, x: nn.Tensor) -> nn.Tensor:
        h = self.norm(x)
        mlp = op.silu(self._linear(self.gate, h)) * self._linear(self.up, h)
        x = x + self._linear(self.down, mlp)
        x = x + op.matmul(x, self.mix, out_dtype=self.acc).astype(self.dtype)
        return self.head(self.final_norm(x)).astype("float32")

    def prefill(self, ids: nn.Tensor) -> nn.Tensor:
        return self._body(self.embed(ids))

    def decode(self, x: nn.Tensor) -> nn.Tensor:
        return self._body(x)

    def decode_one(self, x: nn.Tensor) -> nn.Tensor:
        """Static single row: matmuls without a row axis, a one-row RMSNorm."""
        return self._body(x)


def _reference(params: dict[str, np.ndarray], x: np.ndarray, dtype: str) -> np.ndarray:
    """numpy forward with the model's roundings (fp16 activations between ops)."""
    x = x.astype("float32")

    def rnd(a):
        return a.astype(dtype).astype("float32")

    def norm(a, name="norm.weight"):
        return rnd(a / np.sqrt((a * a).mean(-1, keepdims=True) + EPS) * params[name])

    def linear(a, name):
        return a @ params[name].T

    h = norm(x)
    gate, up = rnd(linear(h, "gate.weight")), rnd(linear(h, "up.weight"))
    mlp = rnd(rnd(gate / (1.0 + np.exp(-gate))) * up)
    x = rnd(x + rnd(linear(mlp, "down.weight")))
    x = rnd(x + rnd(x @ params["mix"]))
    return rnd(linear(norm(x, "final_norm.weight"), "head.weight"))


def _export(dtype: str):
    spec = {
        "prefill": {"ids": nn.spec.Tensor([1, "seq_len"], "int32")},
        "decode": {"x": nn.spec.Tensor(["batch", 1, HIDDEN], dtype)},
        "decode_one": {"x": nn.spec.Tensor([1, 1, HIDDEN], dtype)},
    }
    return _Tiny(dtype).export_tvm(spec=spec)


def _fused(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The module as the schedule sees it: transposes folded, legalized, fused."""
    with target:
        return tvm.transform.Sequential(
            [relax.transform.FuseTransposeMatmul()] + relax.pipeline.legalize_passes(target)
        )(mod)


def _loop_kinds(stmt) -> set:
    kinds = set()
    tvm_ffi.structural_walk(stmt, [(tvm.tirx.For, lambda loop: kinds.add(loop.kind))], order="post")
    return kinds


def _has_parallel_loop(stmt) -> bool:
    return tvm.tirx.ForKind.PARALLEL in _loop_kinds(stmt)


def _gemv_gemm_branches(func: tvm.tirx.PrimFunc) -> list:
    """The two bodies of the run-time GEMV/GEMM switch of a matmul function."""
    switch = func.body.block.body
    return [switch.then_case, switch.else_case] if isinstance(switch, tvm.tirx.IfThenElse) else []


@pytest.fixture(scope="module")
def target():
    return cpu_target({"kind": "llvm", "mcpu": "native"})


def test_cpu_target_resolves_native(target):
    assert str(target.attrs["mcpu"]) not in ("native", "generic")
    assert cpu_target({"kind": "llvm", "mcpu": "generic"}).attrs["mcpu"] == "generic"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_matmuls_are_parallel(dtype, target):
    mod, _ = _export(dtype)
    scheduled = schedule_for_cpu(_fused(mod, target), target)
    matmuls = {gv.name_hint: f for gv, f in scheduled.functions_items() if "matmul" in gv.name_hint}
    for name, func in matmuls.items():
        assert func.attrs["tirx.is_scheduled"], name
        assert _has_parallel_loop(func.body), name
    # gate, up, down, mix (with their epilogues) and head, in prefill and decode:
    # a GEMV and a GEMM, both parallel, switched on the symbolic row count.
    switches = [_gemv_gemm_branches(f) for f in matmuls.values() if _gemv_gemm_branches(f)]
    assert len(switches) >= 8
    assert all(_has_parallel_loop(branch) for pair in switches for branch in pair)
    # The RMSNorm reductions (alone, or fused with the normalisation) too:
    # parallel over rows, vectorised (a static single row: vectorised only).
    norms = [
        f
        for gv, f in scheduled.functions_items()
        if "sum" in gv.name_hint or "rms_norm" in gv.name_hint
    ]
    assert len(norms) >= 4
    for func in norms:
        kinds = _loop_kinds(func.body)
        assert tvm.tirx.ForKind.VECTORIZED in kinds
        static = "batch" not in func.script() and "seq_len" not in func.script()
        assert tvm.tirx.ForKind.PARALLEL in kinds or static


def _static_matmul(rows: int, cols: int, depth: int, dtype: str) -> tvm.tirx.PrimFunc:
    """``C[0, i, j] = sum_k f32(A[0, i, k]) * f32(W[j, k])`` with static shapes."""
    i64 = lambda v: tvm.tirx.IntImm("int64", v)  # noqa: E731
    a = te.placeholder((i64(1), i64(rows), i64(depth)), dtype, name="A")
    w = te.placeholder((i64(cols), i64(depth)), dtype, name="W")
    k = te.reduce_axis((i64(0), i64(depth)), "k")
    c = te.compute(
        (i64(1), i64(rows), i64(cols)),
        lambda b, i, j: te.sum(a[b, i, k].astype("float32") * w[j, k].astype("float32"), axis=k),
        name="NT_matmul",
    )
    return te.create_prim_func([a, w, c])


@pytest.mark.parametrize("rows", [1, GEMV_MAX_ROWS + 16, GEMV_MAX_ROWS + 5])
def test_static_shape_matmul(rows, target):
    """Static row counts: GEMV, GEMM on unpadded rows, GEMM on padded rows."""
    mod = tvm.IRModule({"main": _static_matmul(rows, 96, 64, "float16")})
    func = schedule_for_cpu(mod, target)["main"]
    blocks = []
    tvm_ffi.structural_walk(func.body, [(tvm.s_tir.SBlock, blocks.append)])
    updates = [b for b in blocks if b.name_hint.endswith("_update")]
    if rows >= GEMV_MAX_ROWS:  # the GEMM's inner loop reads the packed panel, not W
        assert updates and all(r.source.name != "W" for b in updates for r in b.reads)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((1, rows, 64)).astype("float16")
    w = rng.standard_normal((96, 64)).astype("float16")
    out = tvm.runtime.tensor(np.zeros((1, rows, 96), "float32"))
    kernel = tvm.tirx.build(tvm.IRModule({"main": func}), target=target)["main"]
    kernel(tvm.runtime.tensor(a), tvm.runtime.tensor(w), out)
    want = a[0].astype("float32") @ w.astype("float32").T
    np.testing.assert_allclose(out.numpy()[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_scheduled_functions_are_left_alone(target):
    @T.prim_func(s_tir=True)
    def hand_written(
        a: T.Buffer((T.int64(64), T.int64(64)), "float32"), b: T.Buffer((T.int64(64),), "float32")
    ):
        T.func_attr({"tirx.is_scheduled": True})
        for i, k in T.grid(T.int64(64), T.int64(64)):
            with T.sblock("sum"):
                vi, vk = T.axis.remap("SR", [i, k])
                with T.init():
                    b[vi] = T.float32(0)
                b[vi] = b[vi] + a[vi, vk]

    mod = tvm.IRModule({"hand_written": hand_written})
    assert schedule_for_cpu(mod, target)["hand_written"].same_as(hand_written)


def _run(dtype: str, pipeline, target, params, ids, x):
    mod, _ = _export(dtype)
    ex = tvm.compile(mod, target=target, relax_pipeline=pipeline)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    weights = [tvm.runtime.tensor(params[name]) for name in _PARAM_ORDER]
    prefill = [vm["prefill"](tvm.runtime.tensor(i), *weights).numpy() for i in ids]
    decode = [
        vm["decode" if a.shape[0] > 1 else "decode_one"](tvm.runtime.tensor(a), *weights).numpy()
        for a in x
    ]
    decode.append(vm["decode"](tvm.runtime.tensor(x[0]), *weights).numpy())
    return prefill, decode


def _unscheduled_pipeline(target):
    """The same pipeline without the CPU schedules."""
    passes = cpu_generic_pipeline
    return tvm.transform.Sequential(
        passes.library_dispatch_passes(target)
        + [relax.transform.FuseTransposeMatmul()]
        + passes.legalize_passes(target)
        + passes.dataflow_lower_passes(target)
        + passes.finalize_passes(target)
    )


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_scheduled_model_matches_numpy(dtype, target):
    rng = np.random.default_rng(0)
    shapes = {
        "embed.weight": (VOCAB, HIDDEN),
        "norm.weight": (HIDDEN,),
        "final_norm.weight": (HIDDEN,),
        "gate.weight": (INTER, HIDDEN),
        "up.weight": (INTER, HIDDEN),
        "down.weight": (HIDDEN, INTER),
        "head.weight": (VOCAB, HIDDEN),
        "mix": (HIDDEN, HIDDEN),
    }
    params = {k: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(dtype) for k, s in shapes.items()}
    for name in ("norm.weight", "final_norm.weight"):
        params[name] = (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(dtype)
    # Row counts on both sides of the GEMV/GEMM switch, padded and unpadded.
    seq_lens = [1, 5, GEMV_MAX_ROWS - 1, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 5, 40]
    ids = [rng.integers(0, VOCAB, (1, n)).astype("int32") for n in seq_lens]
    x = [rng.standard_normal((b, 1, HIDDEN)).astype(dtype) for b in (1, 3, GEMV_MAX_ROWS + 1)]

    fp32 = {k: v.astype("float32") for k, v in params.items()}
    want = [_reference(fp32, fp32["embed.weight"][i], dtype) for i in ids]
    want += [_reference(fp32, a, dtype) for a in x]
    want.append(want[len(ids)])  # x[0] once more, through the symbolic-batch decode
    rtol = 1e-5 if dtype == "float32" else 2e-2

    for pipeline in (cpu_pipeline(target), _unscheduled_pipeline(target)):
        prefill, decode = _run(dtype, pipeline, target, params, ids, x)
        for got, ref in zip(prefill + decode, want, strict=True):
            np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


# --------------------------------------------------------------------------
# The rule list: order, failures, kernels left unscheduled
# --------------------------------------------------------------------------
def _column_sum(n: int):
    """``b[j] = sum_i a[i, j]``: a reduction over the outer axis, which no rule knows."""

    @T.prim_func(s_tir=True)
    def column_sum(a: T.Buffer((n, n), "float32"), b: T.Buffer((n,), "float32")):
        for i, j in T.grid(n, n):
            with T.sblock("colsum"):
                vi, vj = T.axis.remap("RS", [i, j])
                with T.init():
                    b[vj] = T.float32(0)
                b[vj] = b[vj] + a[vi, vj]

    return column_sum


def _column_sum_model(n: int) -> tvm.IRModule:
    """A Relax module whose one kernel is :func:`_column_sum`."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, n), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            kernel = bb.add_func(_column_sum(n), "column_sum")
            y = bb.emit(relax.call_tir(kernel, (x,), relax.TensorType((n,), "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


class _Record(CPURule):
    """Records that it was asked, then answers with ``answer(func)``."""

    def __init__(self, label: str, calls: list, answer):
        self.label, self.calls, self.answer = label, calls, answer

    def apply(self, func, target):
        self.calls.append(self.label)
        return self.answer(func)

    def __repr__(self) -> str:
        return f"_Record({self.label})"


class _Raise(CPURule):
    """Raises ``error`` on the kernels it is given."""

    def __init__(self, error: Exception, kernels=None):
        self.error = error
        self.kernels = None if kernels is None else frozenset(kernels)

    def apply(self, func, target):
        raise self.error


def test_default_rule_list():
    rules = cpu_rules()
    assert [type(r) for r in rules] == [Matmul, Reduction, RowReductions, Elementwise, Serial]
    assert rules[-1] is KV_CACHE_SERIAL and KV_CACHE_SERIAL.reason


def _row_func(kind: str):
    """A PrimFunc over a symbolic number of rows, as legalization writes it."""
    n = tvm.tirx.Var("n", "int64")
    x = te.placeholder((n, 32), "float32", name="x")
    if kind == "softmax":
        y = tvm.topi.nn.softmax(x, axis=-1)
    elif kind == "layer_norm":
        w = te.placeholder((32,), "float32", name="w")
        b = te.placeholder((32,), "float32", name="b")
        y = tvm.topi.nn.layer_norm(x, w, b, axis=[-1], epsilon=1e-6)
        return te.create_prim_func([x, w, b, y])
    else:  # one reduction: the Reduction rule's
        y = tvm.topi.sum(x, axis=-1)
    return te.create_prim_func([x, y])


@pytest.mark.parametrize("kind", ["softmax", "layer_norm"])
def test_row_reductions_run_rows_in_parallel(kind, target):
    """Softmax and LayerNorm (the vision tower's): several reductions per row
    get one parallel row loop with every block computed inside it, and give
    the unscheduled function's values."""
    func = _row_func(kind)
    scheduled = RowReductions().apply(func, target)
    assert scheduled is not None and "T.parallel" in scheduled.script()
    rng = np.random.default_rng(0)
    args = [rng.standard_normal((5, 32)).astype("float32")]
    if kind == "layer_norm":
        args += [rng.standard_normal(32).astype("float32") for _ in range(2)]
    outs = []
    for f in (func, scheduled):
        lib = tvm.compile(tvm.IRModule({"main": f}), target=target)
        out = tvm.runtime.tensor(np.zeros((5, 32), "float32"))
        lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
        outs.append(out.numpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6, atol=1e-6)


def test_row_reductions_leave_a_single_reduction_to_the_reduction_rule(target):
    assert RowReductions().apply(_row_func("sum"), target) is None


def test_rules_are_tried_in_order_first_match_wins(target):
    calls = []
    rules = [
        _Record("no", calls, lambda f: None),
        _Record("first", calls, lambda f: f.with_attr("picked_by", "first")),
        _Record("second", calls, lambda f: f.with_attr("picked_by", "second")),
    ]
    mod = tvm.IRModule({"main": _static_matmul(4, 32, 32, "float32")})
    func = schedule_for_cpu(mod, target, rules)["main"]
    assert calls == ["no", "first"]
    assert func.attrs["picked_by"] == "first" and func.attrs["tirx.is_scheduled"]

    # The real rules: a matmul is also a row reduction (innermost axis reduced),
    # so the rule listed first decides its schedule.
    def schedule(rules):
        return schedule_for_cpu(mod, target, rules)["main"]

    as_matmul, as_reduction = schedule([Matmul(), Reduction()]), schedule([Reduction(), Matmul()])
    assert tvm_ffi.structural_equal(as_matmul, schedule([Matmul()]))
    assert tvm_ffi.structural_equal(as_reduction, schedule([Reduction()]))
    assert not tvm_ffi.structural_equal(as_matmul, as_reduction)


def test_no_match_is_does_not_apply(target):
    """A rule that raises _NoMatch (as the built-in ones do) passes to the next rule."""

    class Refuse(CPURule):
        def apply(self, func, target):
            raise _NoMatch

    mod = tvm.IRModule({"main": _static_matmul(4, 32, 32, "float32")})
    alone = schedule_for_cpu(mod, target)["main"]
    after = schedule_for_cpu(mod, target, [Refuse(), *cpu_rules()])["main"]
    assert tvm_ffi.structural_equal(alone, after)


@pytest.mark.parametrize(
    "error",
    # What a refused TVM schedule primitive raises: these used to count as "does not apply".
    [RuntimeError("boom"), ValueError("boom"), IndexError("boom"), TypeError("boom")],
    ids=lambda e: type(e).__name__,
)
def test_a_rule_that_raises_fails_the_build_naming_the_kernel(error, target):
    """Negative control: an exception inside a rule is a build error, not "next rule"."""
    mod, _ = _export("float32")
    names = [gv.name_hint for gv, f in _fused(mod, target).functions_items()]
    kernel = next(n for n in names if "matmul" in n)
    rules = [_Raise(error, kernels=[kernel]), *cpu_rules()]
    match = f"rule _Raise failed on kernel '{kernel}': {type(error).__name__}: boom"
    with pytest.raises(ScheduleRuleError, match=match):
        tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target, rules))
    with pytest.raises(ScheduleRuleError, match=match) as info:
        schedule_for_cpu(_fused(mod, target), target, rules)
    assert info.value.__cause__ is error and "test_schedule_cpu.py:" in str(info.value)
    # The same rule on the other kernels only: the build goes through.
    other = [_Raise(error, kernels=["no_such_kernel"]), *cpu_rules()]
    tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target, other))


def test_a_rule_answering_something_else_fails(target):
    rules = [_Record("bad", [], lambda f: "scheduled")]
    mod = tvm.IRModule({"main": _static_matmul(4, 32, 32, "float32")})
    with pytest.raises(ScheduleRuleError, match="returned str for kernel 'main'"):
        schedule_for_cpu(mod, target, rules)


def test_a_kernel_no_rule_takes_fails_the_build(target):
    """Negative control: a reduction the rules do not know is an error naming it
    (it used to stay serial), in the pass and in a build."""
    for rule in cpu_rules():
        assert rule.kernels is not None or rule.apply(_column_sum(64), target) is None, rule
    mod = _column_sum_model(64)
    with pytest.raises(UnscheduledKernelError, match=r"1 CPU kernel\(s\) .*: column_sum;"):
        schedule_for_cpu(tvm.IRModule({"column_sum": _column_sum(64)}), target)
    with pytest.raises(UnscheduledKernelError, match="column_sum"):
        tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target))
    # Every kernel left is named, not just the first.
    two = tvm.IRModule({"sum_a": _column_sum(64), "sum_b": _column_sum(32)})
    with pytest.raises(UnscheduledKernelError, match="2 CPU kernel.*sum_a, sum_b"):
        schedule_for_cpu(two, target)


def test_serial_rule_allows_a_named_kernel(target):
    rules = [*cpu_rules(), Serial("a test kernel that is fine serial", ["column_sum"])]
    func = _column_sum(64)
    out = schedule_for_cpu(tvm.IRModule({"column_sum": func}), target, rules)
    assert out["column_sum"].same_as(func)  # as it was: not marked scheduled
    pipeline = cpu_pipeline(target, rules)
    ex = tvm.compile(_column_sum_model(64), target=target, relax_pipeline=pipeline)
    x = np.random.default_rng(0).standard_normal((64, 64)).astype("float32")
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, x.sum(0), rtol=1e-5, atol=1e-5)
    # Only the kernels it names.
    with pytest.raises(UnscheduledKernelError, match="other_sum"):
        schedule_for_cpu(tvm.IRModule({"other_sum": func}), target, rules)


def test_what_needs_a_schedule():
    assert needs_schedule(_column_sum(64))
    assert TINY_ITERATIONS >= 16 and not needs_schedule(_column_sum(4))  # 16 iterations
    assert not needs_schedule(_column_sum(64).with_attr("tirx.is_scheduled", True))
    assert not needs_schedule(_column_sum(64).with_attr("tirx.is_host_func", True))

    @T.prim_func(s_tir=True)
    def scalar(a: T.Buffer((1,), "float32"), b: T.Buffer((1,), "float32")):
        with T.sblock("copy"):
            b[0] = a[0] * T.float32(2)

    @T.prim_func(s_tir=True)
    def symbolic(var_a: T.handle, var_b: T.handle):
        n = T.int64()
        a = T.match_buffer(var_a, (n, 2), "float32")
        b = T.match_buffer(var_b, (2,), "float32")
        for i, j in T.grid(n, 2):
            with T.sblock("colsum"):
                vi, vj = T.axis.remap("RS", [i, j])
                with T.init():
                    b[vj] = T.float32(0)
                b[vj] = b[vj] + a[vi, vj]

    assert not needs_schedule(scalar)
    assert needs_schedule(symbolic)  # a symbolic extent is never tiny


@pytest.mark.parametrize(
    ("preset", "quant"), [("host", "q4f16_1"), ("aarch64", "q0f16"), ("aarch64", "q4f16_1")]
)
def test_tiny_model_every_kernel_scheduled(preset, quant):
    """The real tiny model: every kernel a rule schedules is marked, the rest
    is a reshape, hand-written (marked) or in KV_CACHE_SERIAL; it builds."""
    from qwen35_mobile.compile import pipeline
    from qwen35_mobile.compile.config import preset as model_preset
    from qwen35_mobile.targets import get_target

    target_preset = get_target(preset)
    exported = pipeline.export(model_preset("tiny"), quant, target_preset)
    target = target_preset.tvm_target(exported.dtype)
    fused = _fused(exported.mod, target)
    scheduled = schedule_for_cpu(fused, target)
    kernels = {gv.name_hint: f for gv, f in scheduled.functions_items()}
    kernels = {n: f for n, f in kernels.items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert set(KV_CACHE_SERIAL.kernels) <= set(kernels)  # the allowlist names real kernels
    for name, func in kernels.items():
        if not _marked(func):
            assert name in KV_CACHE_SERIAL.kernels or relax.analysis.has_reshape_pattern(func), name
    by_rule = [n for n, f in kernels.items() if _marked(f) and not _marked(fused[n])]
    matmuls = [n for n in by_rule if "matmul" in n]
    assert len(by_rule) > 20 and len(matmuls) > 5
    assert all(_has_parallel_loop(kernels[n].body) for n in matmuls)
    tvm.relax.build(exported.mod, target, relax_pipeline=cpu_pipeline(target))


def _marked(func) -> bool:
    return func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))
