"""The whole model on WebGPU as a web page runs it: a webgpu artifact's
``model.wasm`` (the model linked with TVM's web runtime, compile/wasm.py)
instantiated by tvmjs, its weights loaded by tvmjs's own tensor-cache loader,
its VM, paged KV cache and RNN state driven from Node (``dawn/run_model.mjs``)
on Dawn (npm ``webgpu``) over Mesa lavapipe.

:class:`WebEngine` is :class:`~qwen35_mobile.bindings.engine.Engine` with the VM
calls sent to that Node process: the sequence bookkeeping, prefill chunking and
M-RoPE offsets are the engine's own code, so :func:`~..report.collect_ours`
drives it exactly as it drives the host build.  Per step the host sends token
ids (and offsets) and receives the logits; nothing else crosses (an image
prompt's embeddings are merged on the host, as the Python engine does).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ...bindings import web_runtime
from ...bindings.engine import Engine
from ...errors import UserError
from . import webgpu

MODEL_RUNNER = Path(__file__).resolve().parent / "dawn" / "run_model.mjs"


def available() -> str | None:
    """None when the whole model can run on Dawn here, else what is missing."""
    return webgpu.available() or web_runtime.why_unavailable()


class _Embeddings:
    """What the engine's ``_embed`` returns here: token ids, or host rows once an
    image prompt needs them (``numpy()``), with the shape ``_reshape`` gives."""

    def __init__(self, engine: WebEngine, tokens=None, host=None):
        self.engine, self.tokens, self.host, self.shape = engine, tokens, host, None

    def numpy(self) -> np.ndarray:
        if self.host is None:
            self.host = self.engine._remote_embed(self.tokens)
        return self.host


class WebEngine(Engine):
    """An artifact's model.wasm run by tvmjs in Node on Dawn (see the module doc)."""

    def __init__(
        self,
        artifact: Path,
        *,
        context_window: int | None = None,
        max_batch_size: int | None = None,
    ):
        from ...bindings.contract import check_contract

        self.artifact = Path(artifact)
        manifest = self.manifest = check_contract(self.artifact, runs_here=False)
        if manifest["target"] != "webgpu" or not manifest.get("wasm"):
            raise UserError(
                f"{self.artifact}: not a webgpu artifact with a linked model.wasm "
                f"(target {manifest['target']}, wasm {manifest.get('wasm')}); compile it with "
                f"--target webgpu after `{web_runtime.SETUP}`"
            )
        why = available()
        if why:
            raise UserError(f"cannot run {self.artifact} on WebGPU here: {why}")
        self._read_config(context_window, max_batch_size)
        entries = manifest.get("entry_points") or {}
        vision = entries.get("vision")
        # Engine's checks read vision_params only for None-ness: the names stand in.
        self.vision_params = None if vision is None else vision["parameters"]
        self._tmp = tempfile.TemporaryDirectory(prefix="qwen35-web-")
        self._files = 0
        self.steps: list[dict] = []  # per forward call: func, tokens, seconds (Node's clock)
        self._proc = _NodeModel()
        params = (entries.get("text") or {}).get("parameters") or [
            p["name"] for p in manifest["parameters"]
        ]
        self.opened = self._proc.request(
            {
                "op": "open",
                "artifact": str(self.artifact.resolve()),
                "wasm": str((self.artifact / manifest["wasm"]).resolve()),
                "params": params,
                "vision_params": self.vision_params,
                "dtype": self.dtype,
                "sizes": {
                    "max_batch": self.max_batch_size,
                    "max_total": self.context_window * self.max_batch_size,
                    "prefill_chunk": self.prefill_chunk,
                    "page_size": 16,
                },
            }
        )
        # A WebGPU storage binding holds at most max_binding bytes (128 MB on lavapipe and
        # many browsers): all-position logits are taken in chunks that fit.
        fits = int(self.opened["max_binding"]) // (self.vocab_size * 4)
        self.prefill_chunk = max(1, min(self.prefill_chunk, fits))

    # ---- the VM calls, in Node -------------------------------------------
    def _on_caches(self, builtin: str, seq_id: int) -> None:
        op = {"add_sequence": "add", "remove_sequence": "remove"}[builtin]
        self._proc.request({"op": op, "seq": int(seq_id)})

    def _path(self, name: str) -> str:
        self._files += 1
        return os.path.join(self._tmp.name, f"{self._files}-{name}")

    def _embed(self, token_ids: np.ndarray) -> _Embeddings:
        return _Embeddings(self, tokens=np.asarray(token_ids, dtype=np.int64).reshape(-1))

    def _tensor(self, array: np.ndarray) -> _Embeddings:
        return _Embeddings(self, host=np.ascontiguousarray(array))

    @staticmethod
    def _reshape(embed: _Embeddings, shape) -> _Embeddings:
        embed.shape = tuple(shape)
        return embed

    def _remote_embed(self, tokens: np.ndarray) -> np.ndarray:
        out = self._path("embed.bin")
        reply = self._proc.request({"op": "embed", "tokens": tokens.tolist(), "out": out})
        return _read(out, reply)

    def _forward(self, func: str, seq_ids, lengths, embed: _Embeddings, offsets: np.ndarray):
        out = self._path("logits.bin")
        req = {
            "op": "forward",
            "func": func,
            "seqs": [int(s) for s in seq_ids],
            "lengths": [int(n) for n in lengths],
            "shape": list(embed.shape[:2]),
            "offsets": offsets.astype(np.int32).reshape(-1).tolist(),
            "out": out,
        }
        if embed.host is not None:  # rows merged on the host (image prompts)
            rows = self._path("embeds.bin")
            embed.host.astype(self.dtype).tofile(rows)
            req["embeds"] = rows
        else:
            req["tokens"] = embed.tokens.tolist()
        reply = self._proc.request(req)
        self.steps.append({"func": func, "tokens": int(sum(lengths)), "seconds": reply["seconds"]})
        for seq_id, n in zip(seq_ids, lengths):
            self._lengths[seq_id] += n
        return _read(out, reply)

    def _image_embed(self, pixels: np.ndarray) -> np.ndarray:
        path, out = self._path("pixels.bin"), self._path("image.bin")
        np.ascontiguousarray(pixels, dtype=np.uint8).tofile(path)
        reply = self._proc.request(
            {"op": "image", "pixels": path, "hw": list(pixels.shape[:2]), "out": out}
        )
        os.unlink(path)
        self.steps.append({"func": "image_embed", "tokens": 0, "seconds": reply["seconds"]})
        return _read(out, reply)

    def call(self, func: str, *args: np.ndarray | int) -> list[np.ndarray] | str:
        """Any other VM function that takes no parameters (WebLLM's ``_metadata`` and
        sampler: compile/model/webllm.py) on arrays or ints: its tensors (dtypes kept),
        or the string it returns."""
        files, spec = [], []
        for a in args:
            if isinstance(a, int):
                spec.append({"int": a})
                continue
            path = self._path("arg.bin")
            np.ascontiguousarray(a).tofile(path)
            files.append(path)
            spec.append({"file": path, "dtype": str(a.dtype), "shape": list(a.shape)})
        out = self._path(func)
        try:
            reply = self._proc.request({"op": "call", "func": func, "args": spec, "out": out})
        finally:
            for path in files:
                os.unlink(path)
        if "value" in reply:
            return reply["value"]
        return [_read(f"{out}.{i}", r, keep_dtype=True) for i, r in enumerate(reply["outputs"])]

    def close(self) -> None:
        self._proc.close()
        self._tmp.cleanup()


def _read(path: str, reply: dict, *, keep_dtype: bool = False) -> np.ndarray:
    """A tensor the runner wrote (raw bytes; shape and dtype in its reply), as float32
    (``keep_dtype``: as written)."""
    data = np.fromfile(path, dtype=np.dtype(reply["dtype"]).newbyteorder("<"))
    os.unlink(path)
    data = data.reshape(reply["shape"])
    return data if keep_dtype else data.astype(np.float32)


class _NodeModel(webgpu._Runner):
    """One ``node dawn/run_model.mjs`` process (webgpu.py's runner, this script)."""

    def __init__(self):
        bundle = web_runtime.tvmjs_bundle()
        super().__init__(
            script=MODEL_RUNNER, extra_env={"QWEN35_TVMJS": str(bundle)}, handshake=False
        )


def ours(artifact: Path, progress=None) -> Callable:
    """For ``run_parity(..., ours=...)``: the compiled side computed by tvmjs on Dawn;
    the engine's timings go to ``ours.steps`` after the run."""

    def collect(encoded, new_tokens, images=None, image_cases=None) -> dict[str, np.ndarray]:
        from ..report import collect_ours

        engine = WebEngine(artifact)
        try:
            if progress:
                progress(
                    f"tvmjs on Dawn: model.wasm and weights loaded in {engine.opened['seconds']:.1f} s "
                    f"({engine.opened['adapter']['description'] if engine.opened.get('adapter') else 'adapter ?'})"
                )
            got = collect_ours(
                engine, encoded, new_tokens, progress, images=images, image_cases=image_cases
            )
            collect.steps = engine.steps
            return got
        finally:
            engine.close()

    collect.steps = []
    return collect


def speed(steps: list[dict]) -> dict:
    """Prefill and decode tokens/s from the engine's step timings (first calls, which
    compile the shaders, excluded when there are others)."""
    out = {}
    for kind, funcs in (("prefill", ("prefill", "prefill_all_logits")), ("decode", ("decode",))):
        rows = [s for s in steps if s["func"] in funcs]
        if len(rows) > 1:
            rows = rows[1:]
        tokens, seconds = sum(r["tokens"] for r in rows), sum(r["seconds"] for r in rows)
        out[kind] = None if not seconds else round(tokens / seconds, 2)
    return out
