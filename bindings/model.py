"""The user-facing model: ``Model.load(artifact_dir).generate(prompt)``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import UserError
from .engine import Engine

VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def chat_prompt(
    user: str, *, thinking: bool = False, system: str | None = None, images: int = 0
) -> str:
    """The Qwen chat template for one user turn, ready for the assistant.

    ``images`` placeholders come first in the turn, as the template renders a
    message whose content is [image, ..., text]; each single ``<|image_pad|>``
    becomes the image's tokens later (:meth:`Model.expand_images`), as
    transformers' processor does.  With thinking off, an empty
    ``<think></think>`` block is pre-filled (as the official template does for
    ``enable_thinking=False``)."""
    text = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    text += f"<|im_start|>user\n{VISION_PLACEHOLDER * images}{user}<|im_end|>\n"
    text += "<|im_start|>assistant\n"
    return text + ("<think>\n" if thinking else "<think>\n\n</think>\n\n")


def sample(
    logits: np.ndarray, rng: np.random.Generator, temperature: float, top_p: float, top_k: int
) -> int:
    """Greedy when temperature is 0; otherwise top-k, then top-p, then sample."""
    if temperature <= 0:
        return int(np.argmax(logits))
    logits = logits.astype(np.float64) / temperature
    k = min(top_k, logits.size) if top_k > 0 else logits.size
    idx = np.argpartition(-logits, k - 1)[:k]
    idx = idx[np.argsort(-logits[idx])]
    probs = np.exp(logits[idx] - logits[idx[0]])
    probs /= probs.sum()
    keep = int(np.searchsorted(np.cumsum(probs), top_p) + 1) if top_p < 1 else k
    probs = probs[:keep] / probs[:keep].sum()
    return int(idx[rng.choice(keep, p=probs)])


class Model:
    """A compiled Qwen3.5 artifact, loaded for the host CPU."""

    def __init__(self, engine: Engine, tokenizer):
        self.engine = engine
        self.tokenizer = tokenizer
        chat = engine.chat  # mlc-chat-config.json: stop ids and sampling defaults
        eos = chat.get("eos_token_id")
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])
        self.sampling = {key: chat[key] for key in ("temperature", "top_p", "top_k")}

    @classmethod
    def load(
        cls,
        artifact_dir: str | Path,
        *,
        context_window: int | None = None,
        max_batch_size: int | None = None,
    ) -> Model:
        from tokenizers import Tokenizer

        artifact_dir = Path(artifact_dir)
        engine = Engine(artifact_dir, context_window=context_window, max_batch_size=max_batch_size)
        tok_file = artifact_dir / "tokenizer.json"
        if not tok_file.exists():
            raise UserError(f"{artifact_dir}: no tokenizer.json in the artifact")
        try:
            tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises bare Exceptions
            raise UserError(
                f"{tok_file}: not a tokenizer this runtime can read ({' '.join(str(e).split())})"
            ) from None
        return cls(engine, tokenizer)

    @property
    def manifest(self) -> dict:
        return self.engine.manifest

    # ---- images -------------------------------------------------------------
    def prepare_images(self, images) -> list[np.ndarray]:
        """PIL images, paths or uint8 arrays -> the uint8 RGB pixels ``image_embed``
        takes, resized by the artifact's rule (bindings/image.py)."""
        from .image import prepare

        if self.engine.image is None:
            raise self.engine.no_tower()
        return [prepare(image, self.engine.image["resize"]) for image in images]

    def embed_image(self, image) -> np.ndarray:
        """A PIL image, a path or a uint8 array -> its token embeddings [t, hidden]."""
        (pixels,) = self.prepare_images([image])
        return self.engine.embed_image(pixels)

    def expand_images(self, ids: list[int], pixels: list[np.ndarray]) -> list[int]:
        """Each single ``<|image_pad|>`` of ``ids`` repeated to its image's token
        count (bindings/image.py: expand_placeholders)."""
        from .image import expand_placeholders

        pad = self.engine.image["tokens"]["image_pad"] if self.engine.image else None
        return expand_placeholders(ids, [self._grid(p) for p in pixels], pad)

    def _grid(self, pixels: np.ndarray) -> tuple[int, int]:
        from .image import grid

        return grid(pixels, self.engine.image["input"]["multiple_of"])

    def _with_images(self, ids, images) -> tuple[list[int], list[np.ndarray]]:
        """``ids`` with each placeholder expanded to its image, and the images'
        pixels (resized); ``ids`` as they are without images."""
        pixels = self.prepare_images(images) if images else []
        return (self.expand_images(list(ids), pixels) if pixels else ids), pixels

    def _images_in(self, pixels: list[np.ndarray]) -> list:
        """(embeddings, grid) per image, for Engine.prefill."""
        return [(self.engine.embed_image(p), self._grid(p)) for p in pixels]

    # ---- text ---------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode_tokens(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 256,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        *,
        chat: bool = True,
        thinking: bool = False,
        seed: int | None = None,
        images: list | None = None,
    ) -> Iterator[str]:
        """Yield the reply piece by piece as tokens are generated.  Sampling
        options left at None take the artifact's defaults (mlc-chat-config.json).

        ``images``: PIL images, paths or uint8 RGB arrays, shown to the model
        before the prompt's text (with ``chat=False`` the prompt itself holds one
        ``<|vision_start|><|image_pad|><|vision_end|>`` per image)."""
        temperature = self.sampling["temperature"] if temperature is None else temperature
        top_p = self.sampling["top_p"] if top_p is None else top_p
        top_k = self.sampling["top_k"] if top_k is None else top_k
        images = list(images or [])
        text = chat_prompt(prompt, thinking=thinking, images=len(images)) if chat else prompt
        if max_new_tokens < 0:
            raise UserError("max_new_tokens must be >= 0")
        rng = np.random.default_rng(seed)
        out: list[int] = []
        shown = ""
        for token in self.generate_ids(
            self.encode(text),
            max_new_tokens,
            lambda lg: sample(lg, rng, temperature, top_p, top_k),
            images=images,
        ):
            out.append(token)
            text = self.decode_tokens(out)
            if not text.endswith("\ufffd"):  # wait for a complete UTF-8 character
                yield text[len(shown) :]
                shown = text

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 256,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        **kwargs,
    ) -> str:
        """The whole reply (without the stop token)."""
        return "".join(self.stream(prompt, max_new_tokens, temperature, top_p, top_k, **kwargs))

    def generate_ids(
        self, prompt_ids: list[int], max_new_tokens: int, pick=None, *, images=None
    ) -> Iterator[int]:
        """Token ids of the continuation of ``prompt_ids`` (greedy by default);
        stops after a stop id (not yielded) or ``max_new_tokens``.  ``images``:
        one per ``<|image_pad|>`` placeholder of ``prompt_ids``."""
        pick = pick or (lambda logits: int(np.argmax(logits)))
        if not prompt_ids:
            raise UserError("the prompt is empty")
        prompt_ids, pixels = self._with_images(prompt_ids, images)
        if len(prompt_ids) + max_new_tokens > self.engine.context_window:
            shown = f", {len(pixels)} image(s) included" if pixels else ""
            raise UserError(
                f"the prompt ({len(prompt_ids)} tokens{shown}) plus {max_new_tokens} new tokens "
                f"exceed the context window of {self.engine.context_window} tokens"
            )
        embedded = self._images_in(pixels)  # the tower runs once the prompt is known to fit
        seq = self.engine.add_sequence()
        try:
            logits = self.engine.prefill(seq, prompt_ids, images=embedded)
            for step in range(max_new_tokens):
                token = pick(logits)
                if token in self.stop_ids:
                    return
                yield token
                if step + 1 < max_new_tokens:
                    logits = self.engine.decode([seq], [token])[0]
        finally:
            self.engine.remove_sequence(seq)

    # ---- numbers, for parity ------------------------------------------------------
    def logits(self, token_ids, images=None) -> np.ndarray:
        """Full-vocabulary fp32 logits of every position: [len(token_ids), V]
        (after expanding each ``<|image_pad|>`` to its image, with ``images``)."""
        token_ids, pixels = self._with_images(token_ids, images)
        seq = self.engine.add_sequence()
        try:
            return self.engine.prefill(
                seq, token_ids, all_logits=True, images=self._images_in(pixels)
            )
        finally:
            self.engine.remove_sequence(seq)

    def __repr__(self) -> str:
        m = self.manifest
        return f"Model({self.engine.artifact}, {m['quantization']}, target={m['target']})"
