"""Every kernel call of a real run, with its tensors before and after.

Runs a host-twin artifact (compile/twin.py) through the bindings' Engine and
records each TIR function the run executes:

* the Relax VM's own calls (``call_tir`` kernels: projections, norms, RoPE,
  the DeltaNet and conv kernels...), through the VM's instrument hook;
* the kernels the paged KV cache and the RNN state call from C++ (attention,
  KV append, page copies, state get/set): their ``vm.builtin.*_create``
  functions receive the kernels as arguments, so for the run those builtins
  are replaced by wrappers that hand the cache recording copies of them.

Each :class:`Call` keeps copies of every tensor argument before and after the
call, and the scalars; the replaying emulator runs the device build of the
same kernel on the ``before`` tensors and compares with ``after``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import numpy as np

#: The runtime state objects that call kernels from C++: (the builtin that
#: creates one and takes the kernels as arguments, the library's Relax function
#: that calls it).  The keys are the ``Call.via`` of their kernels' calls.
STATE_BUILTINS = {
    "kv_cache": ("vm.builtin.paged_attention_kv_cache_create", "create_paged_kv_cache"),
    "rnn_state": ("vm.builtin.rnn_state_create", "create_rnn_state"),
}


@dataclasses.dataclass
class Call:
    index: int  # position in the run
    name: str  # the TIR function, as named in the twin
    step: str  # "prefill" or "decode N"
    before: list  # np.ndarray for tensors, int/float for scalars
    after: list  # np.ndarray for tensors (None for scalars)
    via: str = (
        "vm"  # "vm": a call of the Relax VM; "kv_cache"/"rnn_state": called by that runtime object
    )


def _copy(arg):
    import tvm

    if isinstance(arg, tvm.runtime.Tensor):
        return arg.numpy().copy()
    if isinstance(arg, (bool, int, float)):
        return arg
    return None  # objects (caches, shapes, functions): not kernel data


def state_kernel_names(mod) -> dict[str, list[str]]:
    """Per state object (``kv_cache``, ``rnn_state``), the TIR functions its
    create builtin receives in ``mod``, in the order the runtime receives them."""
    return {
        via: _kernel_names(mod, func, builtin) for via, (builtin, func) in STATE_BUILTINS.items()
    }


def _kernel_names(mod, relax_func: str, builtin: str) -> list[str]:
    """The TIR functions passed to ``builtin`` by ``relax_func`` of ``mod``, in
    the order the runtime receives them (tuples flattened)."""
    from tvm import relax

    names: list[str] = []

    def flatten(expr):
        if isinstance(expr, relax.Tuple):
            for field in expr.fields:
                flatten(field)
        elif isinstance(expr, relax.GlobalVar):
            names.append(expr.name_hint)

    def visit(expr):
        if (
            isinstance(expr, relax.Call)
            and expr.args
            and isinstance(expr.args[0], relax.ExternFunc)
            and expr.args[0].global_symbol == builtin
        ):
            for arg in expr.args[1:]:
                flatten(arg)

    relax.analysis.post_order_visit(mod[relax_func], visit)
    return names


class Recorder:
    def __init__(self):
        self.calls: list[Call] = []
        self.step = "setup"
        self.active = False

    def _add(self, name: str, via: str, before: list, args) -> None:
        after = [(_copy(a) if isinstance(b, np.ndarray) else None) for a, b in zip(args, before)]
        self.calls.append(Call(len(self.calls), name, self.step, before, after, via))

    def record(self, name: str, via: str, run, args):
        """Run a kernel the KV cache / RNN state calls, recording it."""
        if not self.active:
            return run(*args)
        before = [_copy(a) for a in args]
        out = run(*args)
        self._add(name, via, before, args)
        return out

    def instrument(self, func, name, before_run, ret, *args):
        """The VM's instrument hook: its calls of TIR functions; its builtins
        (``vm.*``: allocation, the cache protocol; ``runtime.*``: a tensor view)
        are not kernels."""
        if self.active and not name.startswith(("vm.", "runtime.")):
            if before_run:
                self._pending = [_copy(a) for a in args]
            else:
                self._add(name, "vm", self._pending, args)
        return 0


@contextlib.contextmanager
def _wrapped_state_builtins(recorder: Recorder, names: dict[str, list[str]]):
    """Replace the state create builtins by ones that pass recording kernels."""
    import tvm
    import tvm_ffi

    originals = {via: tvm.get_global_func(builtin) for via, (builtin, _) in STATE_BUILTINS.items()}

    def wrapper_for(via: str):
        original = originals[via]
        order = iter(names[via])

        def wrap(arg):
            if isinstance(arg, tvm_ffi.Function):
                name = next(order)
                return lambda *a: recorder.record(name, via, arg, a)
            if isinstance(arg, tvm_ffi.Array):
                return [wrap(x) for x in arg]
            return arg

        def create(*args):
            return original(*[wrap(a) for a in args])

        return create

    try:
        for via, (builtin, _) in STATE_BUILTINS.items():
            tvm_ffi.register_global_func(builtin, wrapper_for(via), override=True)
        yield
    finally:
        for via, original in originals.items():
            tvm_ffi.register_global_func(STATE_BUILTINS[via][0], original, override=True)


def CAPTURE_IMAGE() -> np.ndarray:  # noqa: N802 - a constant, made on demand
    """The image whose vision-tower kernels are captured: 64 x 96 pixels (6
    tokens, 24 patches; already on the 32-pixel grid), fixed random colours."""
    return np.random.default_rng(7).integers(0, 256, (64, 96, 3), dtype=np.uint8)


def capture(twin: Path, prompt_ids: list[int], decode_steps: int = 2, *, mod=None) -> list[Call]:
    """Run ``prompt_ids`` (prefilled in two calls, split at 4/7) and ``decode_steps`` greedy decode steps
    on the host-twin artifact ``twin``, then (when it has the vision tower) one
    small image through ``image_embed``, a prefill with its tokens and a decode
    step, and return every kernel call.  ``mod``:
    the twin's exported Relax module (re-exported from the manifest if None),
    which names the kernels the caches receive."""
    from ...bindings.engine import Engine

    recorder = Recorder()
    with _wrapped_state_builtins(
        recorder, state_kernel_names(mod if mod is not None else export_from_manifest(twin))
    ):
        engine = Engine(twin)
        engine.vm.set_instrument(recorder.instrument)
        seq = engine.add_sequence()
        recorder.active = True
        # Two prefill calls: the second attends to the cache the first filled
        # (paged prefill + state merge), and continues the DeltaNet state.
        split = len(prompt_ids) * 4 // 7 if len(prompt_ids) > 1 else len(prompt_ids)
        for label, part in (
            ("prefill", prompt_ids[:split]),
            ("prefill (continued)", prompt_ids[split:]),
        ):
            if part:
                recorder.step = label
                logits = engine.prefill(seq, part)
        for k in range(decode_steps):
            recorder.step = f"decode {k + 1}"
            logits = engine.decode([seq], [int(np.argmax(logits))])[0]
        if engine.image is not None:  # the vision tower's kernels, on a small image
            recorder.step = "image"
            embeds = engine.embed_image(CAPTURE_IMAGE())
            # ... and its tokens in the sequence: 3-D positions, so mrope_shift rotates
            # (text-only steps have offsets 0, where it copies)
            recorder.step = "image prompt"
            pad = engine.image["tokens"]["image_pad"]
            ids = [prompt_ids[0], *[pad] * len(embeds), prompt_ids[-1]]
            logits = engine.prefill(seq, ids, images=[(embeds, (2, 3))])
            recorder.step = "decode after image"
            engine.decode([seq], [int(np.argmax(logits))])
        recorder.active = False
        engine.remove_sequence(seq)
    return recorder.calls


def export_from_manifest(artifact: Path, preset: str | None = None):
    """The Relax module the artifact was compiled from (its config, quantization
    and target, or ``preset`` instead of its target)."""
    from ...compile import pipeline
    from ...compile.artifact import read_manifest
    from ...compile.config import ImageProcessorConfig, Qwen35Config
    from ...targets import get_target

    manifest = read_manifest(artifact)
    config = Qwen35Config.from_json(manifest["config"])
    image = manifest.get("image")  # built with the vision tower: its processor, as compiled
    processor = None if image is None else ImageProcessorConfig.from_json(image["processor"])
    return pipeline.export(
        config,
        manifest["quantization"],
        get_target(preset or manifest["target"]),
        processor=processor,
    ).mod


def save_calls(calls: list[Call], path: Path, *, with_after: bool = False) -> None:
    """The calls as one .npz: tensors under ``"{i}.b{j}"`` (and ``"{i}.a{j}"``),
    names, steps and scalars in a JSON entry ``"calls"``."""
    arrays: dict[str, np.ndarray] = {}
    meta = []
    for i, call in enumerate(calls):
        scalars = {}
        for j, value in enumerate(call.before):
            if isinstance(value, np.ndarray):
                arrays[f"{i}.b{j}"] = value
                if with_after:
                    arrays[f"{i}.a{j}"] = call.after[j]
            else:
                scalars[j] = value
        meta.append(
            {
                "index": call.index,
                "name": call.name,
                "step": call.step,
                "via": call.via,
                "nargs": len(call.before),
                "scalars": scalars,
            }
        )
    arrays["calls"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


def load_calls(path: Path) -> list[Call]:
    with np.load(path) as data:
        meta = json.loads(bytes(data["calls"]).decode())
        calls = []
        for i, m in enumerate(meta):
            scalars = {int(k): v for k, v in m["scalars"].items()}
            before = [scalars[j] if j in scalars else data[f"{i}.b{j}"] for j in range(m["nargs"])]
            after = [
                None if j in scalars else (data[f"{i}.a{j}"] if f"{i}.a{j}" in data.files else None)
                for j in range(m["nargs"])
            ]
            calls.append(Call(m["index"], m["name"], m["step"], before, after, m["via"]))
    return calls


def run_calls(
    library: Path,
    calls: list[Call],
    progress=None,
    *,
    override: Path | None = None,
    override_kernels: list[str] = (),
) -> list[Call]:
    """Run each call's kernel from the (CPU) library ``library`` on the call's
    ``before`` tensors; the returned calls hold what that library wrote.  The
    kernels named in ``override_kernels`` come from the library ``override``
    instead (``--break-kernel``: one built broken on purpose)."""
    import tvm

    lib = tvm.runtime.load_module(str(library))
    other = tvm.runtime.load_module(str(override)) if override else None
    out = []
    for n, call in enumerate(calls):
        if progress and n % 100 == 0:
            progress(f"replay: {n}/{len(calls)} calls")
        source = other if other is not None and call.name in override_kernels else lib
        func = source.get_function(call.name, query_imports=True)
        args = [tvm.runtime.tensor(a) if isinstance(a, np.ndarray) else a for a in call.before]
        func(*args)
        after = [a.numpy() if isinstance(a, tvm.runtime.Tensor) else None for a in args]
        out.append(dataclasses.replace(call, after=after))
    return out
