"""The user-facing model: ``Model.load(artifact_dir).generate(prompt)``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import UserError
from .engine import Engine


def chat_prompt(user: str, *, thinking: bool = False, system: str | None = None) -> str:
    """The Qwen chat template for one user turn, ready for the assistant.

    With thinking off, an empty ``<think></think>`` block is pre-filled (as
    the official template does for ``enable_thinking=False``)."""
    text = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    text += f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
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
    def embed_image(self, image) -> np.ndarray:
        """A PIL image, a path or a uint8 array -> its token embeddings [t, hidden],
        resized by the artifact's rule first (bindings/image.py)."""
        from .image import prepare

        if self.engine.image is None:
            raise UserError(
                f"{self.engine.artifact}: this artifact has no vision tower (built without "
                "image_embed)"
            )
        return self.engine.embed_image(prepare(image, self.engine.image["resize"]))

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
    ) -> Iterator[str]:
        """Yield the reply piece by piece as tokens are generated.  Sampling
        options left at None take the artifact's defaults (mlc-chat-config.json)."""
        temperature = self.sampling["temperature"] if temperature is None else temperature
        top_p = self.sampling["top_p"] if top_p is None else top_p
        top_k = self.sampling["top_k"] if top_k is None else top_k
        ids = self.encode(chat_prompt(prompt, thinking=thinking) if chat else prompt)
        if max_new_tokens < 0:
            raise UserError("max_new_tokens must be >= 0")
        rng = np.random.default_rng(seed)
        out: list[int] = []
        shown = ""
        for token in self.generate_ids(
            ids, max_new_tokens, lambda lg: sample(lg, rng, temperature, top_p, top_k)
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

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int, pick=None) -> Iterator[int]:
        """Token ids of the continuation of ``prompt_ids`` (greedy by default);
        stops after a stop id (not yielded) or ``max_new_tokens``."""
        pick = pick or (lambda logits: int(np.argmax(logits)))
        if not prompt_ids:
            raise UserError("the prompt is empty")
        if len(prompt_ids) + max_new_tokens > self.engine.context_window:
            raise UserError(
                f"the prompt ({len(prompt_ids)} tokens) plus {max_new_tokens} new tokens exceed the context "
                f"window of {self.engine.context_window} tokens"
            )
        seq = self.engine.add_sequence()
        try:
            logits = self.engine.prefill(seq, prompt_ids)
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
    def logits(self, token_ids) -> np.ndarray:
        """Full-vocabulary fp32 logits of every position: [len(token_ids), V]."""
        seq = self.engine.add_sequence()
        try:
            return self.engine.prefill(seq, token_ids, all_logits=True)
        finally:
            self.engine.remove_sequence(seq)

    def __repr__(self) -> str:
        m = self.manifest
        return f"Model({self.engine.artifact}, {m['quantization']}, target={m['target']})"
