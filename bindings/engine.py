"""The Relax VM behind ``Model``: loads an artifact's library and weights and
drives its two caches (paged KV cache for full attention, RNN state for the
DeltaNet layers).  Nothing outside ``bindings`` sees a VM or a TVM tensor.

Every forward call follows the KV-state protocol of the TVM runtime:
``begin_forward(seq_ids, lengths)`` on both caches, the model function, then
``end_forward`` on both.

Positions (M-RoPE, as transformers' ``get_rope_index``): a text token takes the
sequence's next position p on all three axes (t, h, w) and advances it by one;
an image of gh x gw tokens takes (p, p + row, p + col) and advances p by
max(gh, gw).  The KV cache rotates every token by its index in the sequence;
the model functions take ``rope_offsets`` = position - index per token and
axis, so a text-only sequence has offsets 0 throughout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import UserError

# TVM's CPU thread pool starts with half the hardware threads on x86 (one on
# a 2-vCPU machine) unless told otherwise before its first parallel call.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

# The KV-state builtins the engine calls (one sequence per request, no
# forking and no rollback: the RNN state keeps max_history = 1).
_BUILTINS = ("add_sequence", "remove_sequence", "begin_forward", "end_forward")


class Engine:
    """One loaded model library with its weights and caches."""

    def __init__(
        self,
        artifact: Path,
        *,
        context_window: int | None = None,
        max_batch_size: int | None = None,
    ):
        import tvm
        from tvm import relax

        from .contract import check_contract
        from .tensor_cache import load_tensor_cache

        self.artifact = Path(artifact)
        self.manifest = check_contract(self.artifact)
        self._read_config(context_window, max_batch_size)

        # "cpu", or "opencl" through the runtime add-on, which check_contract loaded
        self.device = tvm.device(self.manifest["device"], 0)
        lib = tvm.runtime.load_module(str(self.artifact / self.manifest["library"]))
        self.vm = relax.VirtualMachine(lib, self.device)
        names = [p["name"] for p in self.manifest["parameters"]]
        if not (self.artifact / "tensor-cache.json").exists():
            raise UserError(
                f"{self.artifact}: the artifact holds no weights (it was compiled from a preset without --weights)"
            )
        arrays = load_tensor_cache(self.artifact, names)
        loaded = {n: tvm.runtime.tensor(a, self.device) for n, a in zip(names, arrays)}
        del arrays
        # Each model function takes its own entry point's parameters, packed in its order.
        entries = self.manifest.get("entry_points") or {"text": {"parameters": names}}
        self.params = [loaded[n] for n in entries["text"]["parameters"]]
        vision = entries.get("vision")
        self.vision_params = None if vision is None else [loaded[n] for n in vision["parameters"]]
        del loaded

        self._f = {name: tvm.get_global_func(f"vm.builtin.kv_state_{name}") for name in _BUILTINS}
        self._shape = tvm.runtime.ShapeTuple
        # The create functions take their sizes as shape tuples (symbolic vars).
        sizes = [
            self.max_batch_size,
            self.context_window * self.max_batch_size,
            self.prefill_chunk,
            16,
            0,
        ]
        self.kv_cache = self.vm["create_paged_kv_cache"](*[self._shape([n]) for n in sizes])
        self.state = self.vm["create_rnn_state"](
            self._shape([self.max_batch_size]), self._shape([1])
        )
        self._caches = (self.kv_cache, self.state)

    def _read_config(self, context_window: int | None, max_batch_size: int | None) -> None:
        """Sizes and the image contract from mlc-chat-config.json and the manifest, and
        the empty sequence bookkeeping (whatever runs the model: this VM, or another)."""
        chat = self.chat = json.loads((self.artifact / "mlc-chat-config.json").read_text())
        self.vocab_size = int(chat["vocab_size"])
        self.hidden_size = int(chat["model_config"]["hidden_size"])
        self.dtype = self.manifest["dtype"]
        self.context_window = int(context_window or chat["context_window_size"])
        self.prefill_chunk = min(int(chat["prefill_chunk_size"]), self.context_window)
        self.max_batch_size = int(max_batch_size or chat.get("max_batch_size", 4))
        self.image = chat.get("image")  # the vision tower's contract, or None
        # the token an image's embeddings replace (None: no tower, image_pad is text)
        self._image_pad = None if self.image is None else int(self.image["tokens"]["image_pad"])
        self._lengths: dict[int, int] = {}
        self._positions: dict[int, int] = {}  # the next M-RoPE position of each sequence
        self._next_id = 0

    # ---- sequences --------------------------------------------------------
    def add_sequence(self) -> int:
        if len(self._lengths) >= self.max_batch_size:
            raise UserError(
                f"at most {self.max_batch_size} sequences can be live at once (max_batch_size)"
            )
        seq_id = self._next_id
        self._next_id += 1
        self._on_caches("add_sequence", seq_id)
        self._lengths[seq_id] = 0
        self._positions[seq_id] = 0
        return seq_id

    def remove_sequence(self, seq_id: int) -> None:
        self._on_caches("remove_sequence", seq_id)
        del self._lengths[seq_id]
        del self._positions[seq_id]

    def _on_caches(self, builtin: str, seq_id: int) -> None:
        for cache in self._caches:
            self._f[builtin](cache, seq_id)

    def live_sequences(self) -> list[int]:
        return list(self._lengths)

    def _check(self, seq_id: int, token_ids: np.ndarray) -> None:
        if seq_id not in self._lengths:
            raise UserError(f"sequence {seq_id} does not exist")
        bad = (token_ids < 0) | (token_ids >= self.vocab_size)
        if bad.any():
            raise UserError(
                f"token id {int(token_ids[bad][0])} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        if self._lengths[seq_id] + len(token_ids) > self.context_window:
            raise UserError(
                f"{self._lengths[seq_id] + len(token_ids)} tokens exceed the context window of "
                f"{self.context_window} tokens"
            )

    # ---- forward ----------------------------------------------------------
    def _forward(self, func: str, seq_ids: list[int], lengths: list[int], embed, offsets):
        offsets = self._tensor(offsets.astype("int32"))
        for cache in self._caches:
            self._f["begin_forward"](cache, self._shape(seq_ids), self._shape(lengths))
        logits, self.kv_cache, self.state = self.vm[func](
            embed, offsets, self.kv_cache, self.state, self.params
        )
        self._caches = (self.kv_cache, self.state)
        for cache in self._caches:
            self._f["end_forward"](cache)
        for seq_id, n in zip(seq_ids, lengths):
            self._lengths[seq_id] += n
        return logits.numpy()

    def _tensor(self, array: np.ndarray):
        import tvm

        return tvm.runtime.tensor(np.ascontiguousarray(array), self.device)

    def _embed(self, token_ids: np.ndarray):
        return self.vm["embed"](self._tensor(token_ids.astype("int32")), self.params)

    @staticmethod
    def _reshape(tensor, shape):
        return _reshape(tensor, shape)

    def no_tower(self) -> UserError:
        """The error for images given to an artifact built without the tower."""
        return UserError(
            f"{self.artifact}: this artifact has no vision tower (it was built without "
            "image_embed); recompile it from a multimodal checkpoint without --no-vision"
        )

    def _offsets(self, seq_id: int, n: int, runs: list) -> np.ndarray:
        """rope_offsets [n, 3] of n tokens appended to a sequence, whose image
        token runs are ``runs`` ((start, end, (rows, cols)) in order); advances
        the sequence's next position."""
        pos = np.empty((n, 3), dtype=np.int64)
        p, j = self._positions[seq_id], 0
        for start, end, (rows, cols) in [*runs, (n, n, (0, 0))]:
            pos[j:start] = (p + np.arange(start - j))[:, None]  # text
            p += start - j
            r, c = np.divmod(np.arange(end - start), max(cols, 1))  # an image, row-major
            pos[start:end] = np.stack([np.full_like(r, p), p + r, p + c], axis=1)
            p, j = p + max(rows, cols), end
        self._positions[seq_id] = p
        index = self._lengths[seq_id] + np.arange(n)
        return pos - index[:, None]

    def prefill(
        self, seq_id: int, token_ids, all_logits: bool = False, images: list | None = None
    ) -> np.ndarray:
        """Append tokens to one sequence.  Returns the logits of the last token
        [V], or of every token [n, V] with ``all_logits``.

        ``images``: (embeddings [t, hidden], (rows, cols)) per run of image_pad
        tokens in ``token_ids``, in order (``embed_image`` gives the embeddings;
        rows x cols = t, the image's token grid); each run takes its image's
        embeddings and M-RoPE positions."""
        token_ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if len(token_ids) == 0:
            raise UserError("prefill needs at least one token")
        self._check(seq_id, token_ids)
        images = list(images or [])
        if images and self._image_pad is None:
            raise self.no_tower()
        # checks before any state changes
        runs = _image_runs(token_ids, self._image_pad, [tuple(g) for _, g in images])
        for embeds, (rows, cols) in images:
            if tuple(np.shape(embeds)) != (rows * cols, self.hidden_size):
                raise UserError(
                    f"image embeddings must be [{rows * cols}, {self.hidden_size}] for a "
                    f"{rows}x{cols} grid, got {list(np.shape(embeds))}"
                )
        # source[i]: the row of the images' stacked embeddings token i takes, -1 for text
        stacked = np.concatenate([e for e, _ in images]) if images else None
        source = np.full(len(token_ids), -1, dtype=np.int64)
        is_image = np.zeros(len(token_ids), dtype=bool)
        for start, end, _ in runs:
            is_image[start:end] = True
        source[is_image] = np.arange(is_image.sum())
        offsets = self._offsets(seq_id, len(token_ids), runs)
        func = "prefill_all_logits" if all_logits else "prefill"
        outs = []
        for start in range(0, len(token_ids), self.prefill_chunk):
            chunk = token_ids[start : start + self.prefill_chunk]
            embed = self._embed(chunk)
            take = source[start : start + len(chunk)]
            if (take >= 0).any():  # image tokens: their rows come from the tower
                host = embed.numpy()
                host[take >= 0] = stacked[take[take >= 0]]
                embed = self._tensor(host)
            embed = self._reshape(embed, (1, len(chunk), self.hidden_size))
            step = offsets[start : start + len(chunk)][None]
            outs.append(self._forward(func, [seq_id], [len(chunk)], embed, step)[0])
        return np.concatenate(outs, axis=0) if all_logits else outs[-1][-1]

    def decode(self, seq_ids: list[int], token_ids) -> np.ndarray:
        """One new token for each sequence, in one batch: logits [b, V]."""
        token_ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if len(token_ids) != len(seq_ids):
            raise UserError("decode needs one token per sequence")
        for seq_id, tok in zip(seq_ids, token_ids):
            self._check(seq_id, tok.reshape(1))
        embed = self._reshape(self._embed(token_ids), (len(seq_ids), 1, self.hidden_size))
        offsets = np.array(
            [[self._positions[s] - self._lengths[s]] * 3 for s in seq_ids], dtype=np.int64
        )[:, None, :]
        for s in seq_ids:
            self._positions[s] += 1
        return self._forward("decode", list(seq_ids), [1] * len(seq_ids), embed, offsets)[:, 0, :]

    # ---- images -----------------------------------------------------------
    def embed_image(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB pixels [H, W, 3] (sides multiples of the contract's factor,
        bindings/image.py resizes) -> the image's token embeddings [t, hidden]."""
        if self.vision_params is None:
            raise self.no_tower()
        f = self.image["input"]["multiple_of"]
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise UserError(f"image_embed takes uint8 [H, W, 3], got {pixels.dtype} {pixels.shape}")
        if pixels.shape[0] % f or pixels.shape[1] % f or 0 in pixels.shape[:2]:
            raise UserError(
                f"image sides must be positive multiples of {f}, got {pixels.shape[:2]}"
            )
        return self._image_embed(pixels)

    def _image_embed(self, pixels: np.ndarray) -> np.ndarray:
        return self.vm["image_embed"](self._tensor(pixels), self.vision_params).numpy()


def _image_runs(token_ids: np.ndarray, image_pad: int | None, grids: list) -> list:
    """(start, end, grid) of each run of ``image_pad`` tokens, one per image;
    a UserError when they do not match the images given.  With no images,
    image_pad is an ordinary token (a text-only prompt may contain it)."""
    if not grids:
        return []
    is_pad = np.concatenate([[0], (token_ids == image_pad).astype(np.int8), [0]])
    edges = np.diff(is_pad)
    starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
    if len(starts) != len(grids):
        raise UserError(
            f"{len(grids)} image(s) given, but the tokens hold {len(starts)} run(s) of image_pad"
        )
    for k, (start, end, (rows, cols)) in enumerate(zip(starts, ends, grids)):
        if end - start != rows * cols:
            raise UserError(
                f"image {k + 1} is {rows}x{cols} = {rows * cols} tokens, but its run of "
                f"image_pad tokens is {end - start} long"
            )
    return list(zip(starts, ends, grids))


def _reshape(tensor, shape):
    """A view of a runtime tensor with a new shape (no copy)."""
    return tensor._create_view(shape)
