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

    def image_embeds(self, image) -> np.ndarray:
        """transformers' own processor (the checkpoint's ``preprocessor_config.json``,
        PIL backend) and vision tower: one image (PIL, path or uint8 array) -> its
        token embeddings [t, hidden] (fp32), and the processor's pixel grid (t, h, w)."""
        import transformers
        from PIL import Image

        torch = self.torch
        if not hasattr(self.model.model, "visual"):
            raise UserError("the reference checkpoint has no vision tower")
        processor = transformers.AutoImageProcessor.from_pretrained(self.path, backend="pil")
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        elif not isinstance(image, Image.Image):
            image = Image.open(image)
        features = processor(images=[image.convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            out = self.model.model.visual(
                features["pixel_values"].to(torch.float32), grid_thw=features["image_grid_thw"]
            )
        return out.pooler_output.float().numpy(), tuple(
            int(v) for v in features["image_grid_thw"][0]
        )

    def logits(self, token_ids, cache=None):
        """Logits [n, V] of ``token_ids`` appended to ``cache`` (None: a fresh
        sequence), and the new cache."""
        torch = self.torch
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([list(token_ids)]), cache=cache, use_cache=True)
        return out.logits[0].float().numpy(), out.past_key_values

    def greedy(self, prompt_ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
        """Greedy continuation: the ``steps`` chosen tokens and the logits [steps, V]
        each choice was made from (the first from the prompt's last position)."""
        logits, cache = self.logits(prompt_ids)
        rows, tokens = [logits[-1]], []
        for _ in range(steps):
            tokens.append(int(np.argmax(rows[-1])))
            if len(tokens) == steps:
                break
            logits, cache = self.logits([tokens[-1]], cache)
            rows.append(logits[-1])
        return tokens, np.stack(rows)
