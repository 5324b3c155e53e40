"""``qwen35-mobile parity ARTIFACT --reference CKPT --emulator NAME``.

From the artifact it takes the model (config), the quantization and the
runtime sizes; from the reference checkpoint the weights.  It compiles what
the emulator runs (parity/emulators/__init__.py says which presets) into a
scratch directory, runs it, and writes ``parity-<emulator>.json`` and a PNG
plot next to the artifact (or where ``report`` says).
"""

from __future__ import annotations

import importlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from ...errors import UserError
from . import get_emulator

#: The kernel replay's run: 120 prompt tokens prefilled in two calls, 68 + 52
#: (capture.py): the chunked DeltaNet path with a partial chunk, then the
#: recurrent path on the carried state, and attention over the cached pages
#: (paged prefill + merge); then two decode steps.
REPLAY_TOKENS = 120
REPLAY_DECODE_STEPS = 2


def _why_unavailable(name: str) -> str | None:
    if name == "metal":  # a static check: its tool is clang (probed with a known-good kernel)
        from ..static_checks import CheckUnavailable, metal_clang

        try:
            metal_clang()
        except CheckUnavailable as err:
            return str(err)
        return None
    return importlib.import_module(
        f".{name}", __package__
    ).available()  # aarch64.py, opencl.py, webgpu.py


def available(name: str) -> str | None:
    """None when emulator ``name`` can run here, else why not (what to install).
    Raises :class:`~.BrokenTool` when it is installed and does not work."""
    reason = _why_unavailable(get_emulator(name).name)
    return f"{reason} (scripts/setup_emulators.sh installs every emulator)" if reason else None


def _compile(reference: Path, preset: str, quant: str, out: Path, chat: dict, progress) -> Path:
    from ...compile.compiler import compile_model

    compile_model(
        str(reference),
        preset,
        quant,
        out,
        context_window=int(chat["context_window_size"]),
        prefill_chunk=int(chat["prefill_chunk_size"]),
        progress=lambda msg: progress(f"  [{preset}] {msg.strip()}"),
    )
    return out


def _runner(emulator: str, preset):
    """(kernel name, PrimFunc, args) -> args after the run, on the emulated device."""
    if emulator == "opencl":
        from .opencl import KernelRunner

        return KernelRunner(preset.tvm_target())
    if emulator == "webgpu":
        from . import webgpu

        target = preset.tvm_target()

        def run(_name, func, args):
            buffers = iter(webgpu.run_primfunc(func, target, args))
            return [next(buffers) if isinstance(a, np.ndarray) else None for a in args]

        return run
    raise ValueError(f"no kernel runner for {emulator}")


def _kernel_check(
    em,
    artifact: Path,
    reference: Path,
    manifest: dict,
    chat: dict,
    work: Path,
    prompt_ids: list[int],
    break_kernel: str | None,
    progress,
) -> dict:
    from ...compile.twin import device_kernels
    from ...targets import get_target
    from . import capture as cap
    from . import replay as rp

    quant, tolerance = manifest["quantization"], rp.KERNEL_TOLERANCE[manifest["dtype"]]
    progress(f"host twin ({em.twin}): compiling")
    twin = _compile(reference, em.twin, quant, work / "twin", chat, progress)
    twin_mod = cap.export_from_manifest(artifact, em.twin)
    progress(
        f"host twin: running {len(prompt_ids)} prompt tokens + {REPLAY_DECODE_STEPS} decode steps, recording every kernel call"
    )
    calls = cap.capture(twin, prompt_ids, REPLAY_DECODE_STEPS, mod=twin_mod)

    preset = get_target(em.kernels)
    t0 = time.time()
    if not preset.is_gpu:  # a CPU library: every call at once, in the emulator
        from . import aarch64

        override = None
        if break_kernel:
            progress(f"building {break_kernel} of the {preset.name} build broken on purpose")
            lib = aarch64.broken_kernel_library(
                cap.export_from_manifest(artifact, preset.name),
                manifest["dtype"],
                break_kernel,
                work / "broken" / "kernel.so",
            )
            override = (lib, [break_kernel])
        progress(f"replaying {len(calls)} kernel calls with the {preset.name} library under qemu")
        done = aarch64.replay(work / "model", calls, progress=progress, override=override)
        rows = rp.compare_calls(calls, done, tolerance)
    else:
        progress(f"device kernels ({preset.name}): scheduling")
        device_mod = cap.export_from_manifest(artifact, preset.name)
        kernels = device_kernels(device_mod, preset)
        if break_kernel:
            if break_kernel not in kernels:
                raise UserError(
                    f"--break-kernel: no kernel '{break_kernel}' in the {preset.name} build"
                )
            kernels[break_kernel] = rp.break_kernel(kernels[break_kernel])
        twin_names, dev_names = cap.state_kernel_names(twin_mod), cap.state_kernel_names(device_mod)
        progress(f"replaying {len(calls)} kernel calls on the {em.name} emulator")
        rows = rp.replay(
            calls,
            kernels,
            lambda c: rp.device_name(c, twin_names, dev_names, kernels),
            _runner(em.name, get_target(em.kernel_host or em.kernels)),
            dtype=manifest["dtype"],
            tolerance=tolerance,
            progress=progress,
        )
    progress(f"replay: {len(calls)} calls in {time.time() - t0:.0f} s")
    return {
        "summary": rp.summarize(rows, tolerance),
        "calls": rows,
        "run": {"prompt_tokens": len(prompt_ids), "decode_steps": REPLAY_DECODE_STEPS},
    }


def _syntax_check(
    em, reference: Path, manifest: dict, work: Path, break_kernel: str | None, progress
) -> dict:
    from ...compile import pipeline
    from ...compile.config import ImageProcessorConfig, Qwen35Config
    from ...targets import get_target
    from ..static_checks import break_metal_kernel, device_source, metal_clang, metal_syntax_errors

    preset = get_target(em.syntax)
    config = Qwen35Config.from_json(manifest["config"])
    progress(f"building the {preset.name} library (no weights) for its device source")
    path = work / preset.output
    image = manifest.get("image")  # with the vision tower when the artifact has it
    processor = None if image is None else ImageProcessorConfig.from_json(image["processor"])
    exported = pipeline.export(config, manifest["quantization"], preset, processor=processor)
    pipeline.build(exported, preset, path)
    source = device_source(path)
    out = {
        "kind": "syntax check (clang, stub metal_stdlib), not parity",
        "kernels": source.count("kernel void"),
    }
    if break_kernel:
        source, broken = break_metal_kernel(source, break_kernel, preset.system_lib_prefix or "")
        out["broken_on_purpose"] = broken
    errors = metal_syntax_errors(source)
    out["pass"] = not errors
    out["failing_kernels"] = sorted(errors)
    out["message"] = (
        f"{out['kernels']} Metal kernels pass the clang syntax check ({metal_clang()}, stub metal_stdlib)"
        if not errors
        else f"{len(errors)} of {out['kernels']} Metal kernels fail the clang syntax check: "
        f"{', '.join(sorted(errors))}\n{next(iter(errors.values()))[:4000]}"
    )
    return out


def run_emulator(
    name: str,
    artifact: Path,
    reference: Path,
    *,
    new_tokens: int = 32,
    report: Path | None = None,
    break_kernel: str | None = None,
    keep: Path | None = None,
    whole_model: bool = True,
    kernels: bool = True,
    progress=print,
) -> dict:
    """Run emulator ``name`` for ``artifact``; write and return the report.

    ``whole_model=False`` skips the whole-model run of the emulators that have one
    (PoCL, qemu, tvmjs on Dawn): only the kernel replay (or the syntax check) runs
    (qemu's replay still compiles the aarch64 build, whose kernels it runs);
    ``kernels=False`` skips the kernel replay: only the whole model runs.
    """
    from ...compile.artifact import read_manifest
    from ..report import DEFAULT_PROMPTS, run_parity
    from .plot import greedy_series, plot

    em = get_emulator(name)
    artifact, reference = Path(artifact), Path(reference)
    manifest = read_manifest(artifact)
    dtype = manifest["dtype"]
    if dtype not in em.dtypes:
        raise UserError(f"the {name} emulator cannot run {dtype} builds: {em.why_not_dtypes}")
    if not (reference / "config.json").exists():
        raise UserError(
            f"{reference}: no config.json; --reference must be the checkpoint the artifact came from"
        )
    reason = available(name)
    if reason:
        raise UserError(f"the {name} emulator is not installed here: {reason}")
    chat = json.loads((artifact / "mlc-chat-config.json").read_text())
    t0 = time.time()
    out = {
        "emulator": name,
        "description": em.description,
        "stands_for": list(em.stands_for),
        "artifact": str(artifact),
        "artifact_target": manifest["target"],
        "reference": str(reference),
        "quantization": manifest["quantization"],
        "dtype": dtype,
    }
    if manifest["target"] not in em.stands_for and manifest["target"] != em.whole_model:
        out["note"] = (
            f"the artifact was built for '{manifest['target']}'; this emulator checks the code of "
            f"{', '.join(em.stands_for)} builds of the same model, quantization and sizes"
        )
    verdicts = []
    with tempfile.TemporaryDirectory(prefix=f"qwen35-{name}-") as tmp:
        work = Path(keep) if keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        # The aarch64 replay runs the kernels of this build: compiled even without the run.
        if em.whole_model == "webgpu" and whole_model:
            from . import web_model

            why = web_model.available()
            if why:
                raise UserError(f"the whole model cannot run on WebGPU here: {why}")
        if em.whole_model and (whole_model or name == "aarch64"):
            if manifest["target"] == em.whole_model and manifest.get("wasm"):
                build = artifact  # the artifact itself is what runs (a linked web build)
            else:
                progress(f"whole model ({em.whole_model}): compiling")
                build = _compile(
                    reference,
                    em.whole_model,
                    manifest["quantization"],
                    work / "model",
                    chat,
                    progress,
                )
        if em.whole_model and whole_model:
            ours = None
            if name == "aarch64":
                from . import aarch64

                ours = aarch64.ours(build, progress=progress)
            elif em.whole_model == "webgpu":
                ours = web_model.ours(build, progress=progress)
            t1 = time.time()
            model = run_parity(
                build, reference, new_tokens=new_tokens, ours=ours, progress=progress
            )
            model["seconds"] = round(time.time() - t1, 1)
            if em.whole_model == "webgpu":
                # tokens/s on Node's clock, shader compilation (each first call) excluded
                model["speed"] = web_model.speed(ours.steps)
            out["model"] = model
            verdicts.append(model["pass"])
        if em.kernels and kernels:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(artifact / "tokenizer.json"))
            ids = tok.encode(DEFAULT_PROMPTS[2], add_special_tokens=False).ids[:REPLAY_TOKENS]
            t1 = time.time()
            out["kernels"] = _kernel_check(
                em, artifact, reference, manifest, chat, work, ids, break_kernel, progress
            )
            out["kernels"]["seconds"] = round(time.time() - t1, 1)
            verdicts.append(out["kernels"]["summary"]["pass"])
        if em.syntax:
            out["syntax"] = _syntax_check(em, reference, manifest, work, break_kernel, progress)
            verdicts.append(out["syntax"]["pass"])
    out["seconds"] = round(time.time() - t0, 1)
    out["pass"] = bool(verdicts) and all(verdicts)

    report = Path(report) if report else artifact / f"parity-{name}.json"
    png = report.with_suffix(".png")
    out["plot"] = str(png) if ("model" in out or em.kernels) else None
    report.write_text(json.dumps(out, indent=1, default=_json_default) + "\n")
    if out["plot"]:
        k = out.get("kernels")
        m = out.get("model")
        plot(
            png,
            f"qwen35-mobile parity --emulator {name}: {manifest['quantization']} "
            f"({'PASS' if out['pass'] else 'FAIL'})",
            kernels=k["calls"] if k else None,
            kernel_tolerance=k["summary"]["tolerance"] if k else None,
            steps=greedy_series(m) if m else None,
            step_tolerance=m["tolerance"]["max_rel"] if m else None,
        )
    return out


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value).__name__)
