"""The reference: Hugging Face transformers (PyTorch, CPU, fp32) on the same
checkpoint.  Imported only for parity; needs the ``test`` extra."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import UserError


class Reference:
    """``Qwen3_5ForConditionalGeneration`` (or ``Qwen3_5ForCausalLM`` for a bare
    text checkpoint) in fp32, with optional rounding of its weights to the
    values the compiled model computes with, so that parity measures the
    kernels, not the cast or the quantization: ``round_to`` names the build's
    parameters (the manifest's; a mapping or any collection of names) and
    ``quant`` is its quantization (compile/quantization.py's registry)."""

    def __init__(
        self,
        checkpoint: str | Path,
        round_to: dict[str, str] | None = None,
        quant: str | None = None,
    ):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import torch
            import transformers
        except ImportError:
            raise UserError(
                "parity needs the reference: pip install 'qwen35-mobile[test]' (torch, transformers)"
            ) from None
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.torch = torch
        path = Path(checkpoint)
        if not (path / "config.json").exists():
            raise UserError(
                f"{checkpoint}: not a Hugging Face checkpoint directory (no config.json)"
            )
        config = transformers.AutoConfig.from_pretrained(path)
        cls = (
            transformers.Qwen3_5ForConditionalGeneration
            if config.model_type == "qwen3_5"
            else transformers.Qwen3_5ForCausalLM
        )
        self.model = cls.from_pretrained(path, dtype=torch.float32).eval()
        self.path = path
        self.version = transformers.__version__
        if round_to:
            self._round_weights(round_to, quant)

    def _round_weights(self, params, quant: str) -> None:
        """Give each parameter our build holds (``params``: the manifest's
        parameter names) the values the build computes with, as the
        quantization registry says (``Quantization.reference_weight``): rounded
        to fp16, or group-quantized and dequantized."""
        from ..compile import quantization

        q = quantization.get(quant)
        torch = self.torch
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                ours = name.removeprefix("model.language_model.").removeprefix("model.")
                if ours not in params:
                    continue  # not in the build (vision tower, mtp)
                array = param.numpy()
                value = q.reference_weight(ours, array)
                if value is not array:
                    param.copy_(torch.from_numpy(value))

    def _pixels(self, images: list):
        """transformers' own image processor (the checkpoint's
        ``preprocessor_config.json``, PIL backend) on images given as PIL images,
        paths or uint8 arrays: pixel_values, image_grid_thw, merge size."""
        import transformers

        from ..bindings.image import open_image

        if not hasattr(self.model.model, "visual"):
            raise UserError("the reference checkpoint has no vision tower")
        processor = transformers.AutoImageProcessor.from_pretrained(self.path, backend="pil")
        opened = [open_image(image).convert("RGB") for image in images]
        features = processor(images=opened, return_tensors="pt")
        return features["pixel_values"].float(), features["image_grid_thw"], processor.merge_size

    def image_embeds(self, image) -> np.ndarray:
        """transformers' own processor and vision tower: one image (PIL, path or
        uint8 array) -> its token embeddings [t, hidden] (fp32), and the
        processor's pixel grid (t, h, w)."""
        pixel_values, grid, _ = self._pixels([image])
        with self.torch.no_grad():
            out = self.model.model.visual(pixel_values, grid_thw=grid)
        return out.pooler_output.float().numpy(), tuple(int(v) for v in grid[0])

    def expand_images(self, token_ids, images: list, image_pad: int):
        """What transformers' Qwen3-VL processor does to a rendered prompt: each
        ``<|image_pad|>`` repeated ``grid_thw.prod() // merge_size**2`` times
        (``Qwen3VLProcessor.replace_image_token``; the processor class itself
        cannot be built here, it needs torchvision for its video half).
        Returns the expanded ids and the model's image inputs."""
        from ..bindings.image import expand_placeholders

        pixel_values, grid, merge = self._pixels(images)
        # grid_thw.prod() // merge**2 tokens per image (t = 1): rows x cols of merged patches
        grids = [(int(h) // merge, int(w) // merge) for _, h, w in grid]
        out = expand_placeholders(list(token_ids), grids, image_pad)
        return out, {"pixel_values": pixel_values, "image_grid_thw": grid}

    def logits(self, token_ids, cache=None, images=None, image_pad: int | None = None):
        """Logits [n, V] of ``token_ids`` appended to ``cache`` (None: a fresh
        sequence), and the new cache.  With ``images`` (fresh sequences only),
        ``token_ids`` holds one ``image_pad`` per image, expanded here as the
        processor does; the model gets pixel_values and the 3-D positions that
        its get_rope_index computes (``mm_token_type_ids``)."""
        torch = self.torch
        kwargs = {}
        if cache is None and hasattr(self.model.model, "rope_deltas"):
            self.model.model.rope_deltas = None  # else a stale image's deltas shift text
        if images:
            token_ids, kwargs = self.expand_images(token_ids, images, image_pad)
            kwargs["mm_token_type_ids"] = torch.tensor([[int(t == image_pad) for t in token_ids]])
        with torch.no_grad():
            out = self.model(
                input_ids=torch.tensor([list(token_ids)]), cache=cache, use_cache=True, **kwargs
            )
        return out.logits[0].float().numpy(), out.past_key_values

    def greedy(
        self, prompt_ids: list[int], steps: int, images=None, image_pad: int | None = None
    ) -> tuple[list[int], np.ndarray]:
        """Greedy continuation: the ``steps`` chosen tokens and the logits [steps, V]
        each choice was made from (the first from the prompt's last position)."""
        logits, cache = self.logits(prompt_ids, images=images, image_pad=image_pad)
        rows, tokens = [logits[-1]], []
        for _ in range(steps):
            tokens.append(int(np.argmax(rows[-1])))
            if len(tokens) == steps:
                break
            logits, cache = self.logits([tokens[-1]], cache)
            rows.append(logits[-1])
        return tokens, np.stack(rows)
