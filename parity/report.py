"""Parity: the compiled model against transformers on the same checkpoint.

Errors are measured per step: ``max_abs = max |ours - ref|`` and
``max_rel = max |ours - ref| / max |ref|`` over the full vocabulary.  Cases:

- ``prefill``: the logits of every prompt position, one call;
- ``continued_prefill``: the prompt in two calls, the second continuing the
  caches of the first (KV cache, conv state and DeltaNet state);
- ``greedy``: N new tokens decoded one by one, free running on both sides;
  logits are compared while both sides have seen the same tokens;
- ``batch_decode``: two prompts decoded together in one batch, each compared
  with its own reference run;
- ``image_tower`` (artifacts with ``image_embed``): each test image through our
  resize and the compiled tower against transformers' processor and tower, the
  error over all its token embeddings;
- ``image_prompt`` (same artifacts): a chat prompt with images, from the image
  files to the logits of every position (text before, image tokens, text
  after) against transformers' processor + ``Qwen3_5ForConditionalGeneration``
  (its own 3-D positions): one image, two images in one prompt, and an image in
  the second turn of a chat whose first turn (with another image) was prefilled
  before; then greedy decoding after each, like the ``greedy`` case.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..bindings.image import expand_placeholders, grid, prepare
from ..bindings.model import Model, chat_prompt
from ..compile import quantization

# Pass criteria per model dtype (docs/parity.md has the measurements).
# fp32: the two sides differ only in summation order and exp/rsqrt rounding:
#   ~1e-6 typical, 1e-5 worst on the tiny models; the reference's own fp32
#   differs from its fp64 by up to 1e-5 there.  Greedy tokens must be identical.
# fp16: activations are rounded to fp16 (unit roundoff 4.9e-4) at every
#   projection; on the tiny models transformers' own fp16 run differs from its
#   fp32 run by up to 2.6e-2 (median 4e-3) with 91-99% top-1 agreement, and
#   ours measures the same.  Near-ties then flip greedy choices, so fp16
#   requires the logit error bound and top-1 agreement, not identical sequences.
CRITERIA = {
    "float32": {"max_rel": 1e-4, "min_top1": 1.0, "greedy_identical": True},
    "float16": {"max_rel": 5e-2, "min_top1": 0.9, "greedy_identical": False},
}
# Per quantization, where its arithmetic is coarser than its dtype's.
# q4f16_i8: the decode GEMVs round their inputs to int8 per group of 32 (unit roundoff 1/254
#   of the group's largest value, against fp16's 4.9e-4 of each value); one 0.8B-shaped GEMV
#   then differs from q4f16_1's by ~0.5% of its largest output (tests/test_q8_gemv.py), and
#   over a model of random weights the decode logits by up to 0.154 (tiny; top-1 0.80-0.97
#   per case) and 0.102 at the 0.8B shape (top-1 0.83-1.0; 8 greedy tokens).  Prefill is
#   q4f16_1's arithmetic (fp16 criteria hold there: 0.021 tiny, 0.017 0.8B).  docs/cpu-speed.md has the measurements; `qwen35-mobile parity` reproduces them.
QUANT_CRITERIA = {
    "q4f16_i8": {"max_rel": 0.3, "min_top1": 0.75, "greedy_identical": False},
}


def criteria_for(manifest: dict) -> dict:
    """The pass criteria of an artifact: its quantization's, else its dtype's."""
    quant, dtype = manifest.get("quantization"), manifest["dtype"]
    return dict(QUANT_CRITERIA.get(quant) or CRITERIA[dtype])


DEFAULT_PROMPTS = [
    chat_prompt("What is the capital of France?"),
    chat_prompt("用一句话介绍你自己。", thinking=True),
    # Longer than the 64-token DeltaNet chunk of the reference.
    "The Gated DeltaNet keeps a fixed-size state per head and updates it with a delta rule: "
    "it decays the state, reads what the state predicts for the current key, and writes back the "
    "difference between the value and that prediction, scaled by a learned step size. Full "
    "attention layers, one in four, keep a paged key-value cache instead. " * 2,
]


def _errors(ours: np.ndarray, ref: np.ndarray) -> dict:
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    return {
        "max_abs": float(diff.max()),
        "max_rel": float(diff.max() / max(np.abs(ref).max(), 1e-30)),
        "top1_agree": bool(np.argmax(ours) == np.argmax(ref)),
    }


def _rows(name: str, ours: np.ndarray, ref: np.ndarray) -> dict:
    steps = [_errors(o, r) for o, r in zip(ours, ref)]
    return {
        "case": name,
        "steps": steps,
        "max_abs": max(s["max_abs"] for s in steps),
        "max_rel": max(s["max_rel"] for s in steps),
        "top1_agreement": float(np.mean([s["top1_agree"] for s in steps])),
    }


def parity_images() -> list[np.ndarray]:
    """The parity images (uint8 RGB): smooth colour ramps with noise, one already
    on the 32-pixel grid (256x320: no resize) and one that the resize rule
    changes (200x300 -> 224x288 after smart_resize's min_pixels upscaling)."""
    rng = np.random.default_rng(1234)
    images = []
    for height, width in ((256, 320), (200, 300)):
        y, x = np.mgrid[0:height, 0:width]
        ramp = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
        noise = rng.normal(0, 25, (height, width, 3))
        images.append(np.clip(ramp + noise, 0, 255).astype(np.uint8))
    return images


def image_prompts(tokenizer, pixels: list[np.ndarray], image: dict) -> list[dict]:
    """The end-to-end image cases for the two parity images: per case, its
    ``name``, ``text_ids`` (the whole conversation as rendered, one
    ``<|image_pad|>`` per image: what the reference's processor expands),
    ``turns`` (our expanded ids, one list per prefill call) and ``images``
    (the parity images each turn shows, by index)."""
    conversations = {
        "one image": ([chat_prompt("Describe the picture in one sentence.", images=1)], [[0]]),
        "two images": ([chat_prompt("What differs between them?", images=2)], [[0, 1]]),
        "second turn": (
            [
                chat_prompt("Describe the picture.", images=1)
                + "A colour ramp with noise.<|im_end|>\n",
                chat_prompt("And this one?", images=1),
            ],
            [[0], [1]],
        ),
    }
    pad, factor = image["tokens"]["image_pad"], image["input"]["multiple_of"]
    cases = []
    for name, (texts, shown) in conversations.items():
        ids = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
        cases.append(
            {
                "name": name,
                "text_ids": [t for turn in ids for t in turn],
                "turns": [
                    expand_placeholders(turn, [grid(pixels[i], factor) for i in which], pad)
                    for turn, which in zip(ids, shown)
                ],
                "images": shown,
            }
        )
    return cases


def tower_case(ours: np.ndarray, ref, image: np.ndarray) -> dict:
    """The vision tower alone: ``ours``, the compiled tower's embeddings of
    ``image`` after our resize (``Model.embed_image``, or ``image_embed`` of the
    prepared pixels in an emulator), against transformers' processor and tower."""
    theirs, grid = ref.image_embeds(image)
    if ours.shape != theirs.shape:
        return {
            "case": "image_tower",
            "steps": [],
            "max_abs": float("inf"),
            "max_rel": float("inf"),
            "problem": f"{ours.shape[0]} image tokens, the reference has {theirs.shape[0]}",
        }
    err = _errors(ours, theirs)
    return {
        "case": "image_tower",
        "steps": [],  # embeddings, not logits: no top-1 to agree on
        "pixels": list(image.shape[:2]),
        "grid_thw": list(grid),
        "tokens": int(ours.shape[0]),
        "max_abs": err["max_abs"],
        "max_rel": err["max_rel"],
    }


def _compared_steps(ours_tokens: list[int], ref_tokens: list[int]) -> int:
    """Steps whose logits come from identical contexts: up to and including
    the first step where the two greedy choices differ."""
    for i, (a, b) in enumerate(zip(ours_tokens, ref_tokens)):
        if a != b:
            return i + 1
    return len(ref_tokens)


def _greedy_ours(
    engine, prompts: list[list[int]], steps: int
) -> tuple[list[list[int]], list[np.ndarray]]:
    """Free-running greedy decoding of several prompts in one decode batch."""
    seqs = [engine.add_sequence() for _ in prompts]
    try:
        last = [engine.prefill(s, p) for s, p in zip(seqs, prompts)]
        rows = [[lg] for lg in last]
        tokens: list[list[int]] = [[] for _ in prompts]
        for step in range(steps):
            for t, r in zip(tokens, rows):
                t.append(int(np.argmax(r[-1])))
            if step + 1 == steps:
                break
            logits = engine.decode(seqs, [t[-1] for t in tokens])
            for r, lg in zip(rows, logits):
                r.append(lg)
        return tokens, [np.stack(r) for r in rows]
    finally:
        for s in seqs:
            engine.remove_sequence(s)


def _greedy_from(engine, seq: int, logits: np.ndarray, steps: int):
    """Greedy decoding of one sequence from the logits of its last position:
    the tokens [steps] and the logits [steps, V] each was chosen from."""
    rows, tokens = [logits], []
    for step in range(steps):
        tokens.append(int(np.argmax(rows[-1])))
        if step + 1 < steps:
            rows.append(engine.decode([seq], [tokens[-1]])[0])
    return np.array(tokens, dtype=np.int64), np.stack(rows)


def _all_logits(engine, ids: list[int]) -> np.ndarray:
    seq = engine.add_sequence()
    try:
        return engine.prefill(seq, ids, all_logits=True)
    finally:
        engine.remove_sequence(seq)


def collect_ours(
    engine,
    encoded: list[list[int]],
    new_tokens: int,
    progress=None,
    images: list[np.ndarray] | None = None,
    image_cases: list[dict] | None = None,
) -> dict[str, np.ndarray]:
    """Everything the report needs from the compiled side, as named arrays.

    Needs only an :class:`~.engine.Engine` (no tokenizer, no transformers), so
    it can run in another process: under qemu for the aarch64 emulator.
    Keys: ``p{i}.prefill`` [n, V]; ``p{i}.continued`` [n - split, V] (the
    prompt in two calls, split at ``n // 2``); ``p{i}.greedy_tokens`` and
    ``p{i}.greedy_logits``; ``batch{i}.tokens`` / ``batch{i}.logits`` for the
    first two prompts decoded together in one batch; ``image{i}.embeds``: the
    tower's embeddings of ``images[i]`` (uint8 pixels already resized);
    ``ip{k}.logits`` / ``.greedy_tokens`` / ``.greedy_logits`` for
    ``image_cases[k]`` (:func:`image_prompts`: every turn's logits, then greedy).
    """
    out: dict[str, np.ndarray] = {}
    for i, pixels in enumerate(images or []):
        if progress:
            progress(
                f"ours: image {i + 1}/{len(images)}: {pixels.shape[1]}x{pixels.shape[0]} pixels"
            )
        out[f"image{i}.embeds"] = engine.embed_image(pixels)
    for k, case in enumerate(image_cases or []):
        if progress:
            progress(f"ours: image prompt {k + 1}/{len(image_cases)}: {case['name']}")
        factor = engine.image["input"]["multiple_of"]
        seq = engine.add_sequence()
        try:
            rows = []
            for ids, which in zip(case["turns"], case["images"]):
                shown = [(out[f"image{i}.embeds"], grid(images[i], factor)) for i in which]
                rows.append(engine.prefill(seq, ids, all_logits=True, images=shown))
            out[f"ip{k}.logits"] = np.concatenate(rows)
            tokens, greedy = _greedy_from(engine, seq, rows[-1][-1], new_tokens)
            out[f"ip{k}.greedy_tokens"], out[f"ip{k}.greedy_logits"] = tokens, greedy
        finally:
            engine.remove_sequence(seq)
    for i, ids in enumerate(encoded):
        if progress:
            progress(f"ours: prompt {i + 1}/{len(encoded)}: {len(ids)} tokens")
        out[f"p{i}.prefill"] = _all_logits(engine, ids)
        if len(ids) >= 2:
            split = len(ids) // 2
            seq = engine.add_sequence()
            try:
                engine.prefill(seq, ids[:split])
                out[f"p{i}.continued"] = engine.prefill(seq, ids[split:], all_logits=True)
            finally:
                engine.remove_sequence(seq)
        (tokens,), (rows,) = _greedy_ours(engine, [ids], new_tokens)
        out[f"p{i}.greedy_tokens"], out[f"p{i}.greedy_logits"] = (
            np.array(tokens, dtype=np.int64),
            rows,
        )
    if not encoded:
        return out
    if progress:
        progress("ours: batch decode: two prompts in one batch")
    tokens, rows = _greedy_ours(engine, encoded[:2], new_tokens)
    for i in range(len(tokens)):
        out[f"batch{i}.tokens"], out[f"batch{i}.logits"] = (
            np.array(tokens[i], dtype=np.int64),
            rows[i],
        )
    return out


def run_parity(
    artifact: Path,
    reference: Path,
    *,
    new_tokens: int = 32,
    prompts: list[str] | None = None,
    tolerance: float | None = None,
    progress=print,
    ours=None,
) -> dict:
    """Compare ``artifact`` with transformers.  ``ours``: a callable
    ``(encoded prompts, new_tokens) -> collect_ours(...)`` dict that computes
    the compiled side elsewhere (an emulator); default: this process."""
    from .reference import Reference

    t0 = time.time()
    if ours is None:
        model = Model.load(artifact)
        manifest, tokenizer = model.manifest, model.tokenizer
    else:  # the library runs elsewhere: only the manifest and the tokenizer here
        from tokenizers import Tokenizer

        from ..bindings.artifact import read_manifest

        model, manifest = None, read_manifest(artifact)
        tokenizer = Tokenizer.from_file(str(Path(artifact) / "tokenizer.json"))
    dtypes = {p["name"]: p["dtype"] for p in manifest["parameters"]}
    quant = manifest["quantization"]
    ref = Reference(reference, round_to=dtypes, quant=quant)
    dtype = manifest["dtype"]
    criteria = criteria_for(manifest)
    if tolerance is not None:
        criteria["max_rel"] = tolerance
    prompts = prompts or DEFAULT_PROMPTS
    encoded = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    images = parity_images() if manifest.get("image") is not None else []
    pixels = [prepare(image, manifest["image"]["resize"]) for image in images]
    image_cases = image_prompts(tokenizer, pixels, manifest["image"]) if images else []
    got = (
        ours(encoded, new_tokens, pixels, image_cases)
        if ours
        else collect_ours(
            model.engine, encoded, new_tokens, progress, images=pixels, image_cases=image_cases
        )
    )
    cases = []
    for i, ids in enumerate(encoded):
        progress(f"reference: prompt {i + 1}/{len(encoded)}: {len(ids)} tokens")
        ref_logits, _ = ref.logits(ids)
        cases.append({"prompt": i, **_rows("prefill", got[f"p{i}.prefill"], ref_logits)})
        if f"p{i}.continued" in got:
            split = len(ids) // 2
            cases.append(
                {
                    "prompt": i,
                    "split_at": split,
                    **_rows("continued_prefill", got[f"p{i}.continued"], ref_logits[split:]),
                }
            )

        ref_tokens, ref_rows = ref.greedy(ids, new_tokens)
        our_tokens, our_rows = (
            [int(t) for t in got[f"p{i}.greedy_tokens"]],
            got[f"p{i}.greedy_logits"],
        )
        n = _compared_steps(our_tokens, ref_tokens)
        cases.append(
            {
                "prompt": i,
                **_rows("greedy", our_rows[:n], ref_rows[:n]),
                "greedy_agree": our_tokens == ref_tokens,
                "tokens_ours": our_tokens,
                "tokens_ref": ref_tokens,
                "text_ref": tokenizer.decode(ref_tokens, skip_special_tokens=False),
            }
        )

    progress("reference: batch decode")
    for i, ids in enumerate(encoded[:2]):
        our_tokens, our_rows = [int(t) for t in got[f"batch{i}.tokens"]], got[f"batch{i}.logits"]
        ref_tokens, ref_rows = ref.greedy(ids, new_tokens)
        n = _compared_steps(our_tokens, ref_tokens)
        cases.append(
            {
                "prompt": i,
                **_rows("batch_decode", our_rows[:n], ref_rows[:n]),
                "greedy_agree": our_tokens == ref_tokens,
            }
        )

    for i, image in enumerate(images):
        progress(
            f"reference: image {i + 1}: vision tower, {image.shape[1]}x{image.shape[0]} pixels"
        )
        cases.append({"image": i, **tower_case(got[f"image{i}.embeds"], ref, image)})
    pad = manifest["image"]["tokens"]["image_pad"] if images else None
    for k, case in enumerate(image_cases):
        progress(f"reference: image prompt {k + 1}/{len(image_cases)}: {case['name']}")
        cases.extend(_image_prompt_cases(got, k, case, ref, images, pad, new_tokens))

    quantized = quantization.get(quant).quantized
    cost = _quantization_cost(model, reference, encoded) if quantized and model else None

    worst = max(c["max_rel"] for c in cases)
    greedy_ok = all(c.get("greedy_agree", True) for c in cases)
    top1 = float(np.mean([s["top1_agree"] for c in cases for s in c["steps"]]))
    report = {
        "artifact": str(artifact),
        "reference": str(reference),
        "reference_impl": f"transformers {ref.version}, PyTorch CPU, float32",
        "quantization": quant,
        "dtype": dtype,
        "new_tokens": new_tokens,
        "tolerance": {
            **criteria,
            "reference_weights": "rounded to the artifact's parameter dtypes"
            if dtype != "float32"
            else "as stored",
        },
        "summary": {
            "max_rel": worst,
            "max_abs": max(c["max_abs"] for c in cases),
            "top1_agreement": top1,
            "greedy_agreement": greedy_ok,
            "seconds": round(time.time() - t0, 1),
        },
        "cases": cases,
    }
    if cost is not None:
        report["quantization_cost"] = cost
    report["pass"] = bool(
        worst <= criteria["max_rel"]
        and top1 >= criteria["min_top1"]
        and (greedy_ok or not criteria["greedy_identical"])
    )
    return report


def _image_prompt_cases(got, k: int, case: dict, ref, images, pad: int, new_tokens: int):
    """The ``image_prompt`` case (every position of every turn) and its greedy
    continuation, against transformers on the whole conversation at once."""
    shown = [images[i] for which in case["images"] for i in which]
    ref_logits, _ = ref.logits(case["text_ids"], images=shown, image_pad=pad)
    ours = got[f"ip{k}.logits"]
    tag = {"image_prompt": case["name"], "turns": [len(t) for t in case["turns"]]}
    if ours.shape != ref_logits.shape:  # our resize or expansion gave other token counts
        problem = f"{ours.shape[0]} positions, the reference has {ref_logits.shape[0]}"
        bad = {"steps": [], "max_abs": float("inf"), "max_rel": float("inf"), "problem": problem}
        return [{"case": "image_prompt", **tag, **bad}]
    ref_tokens, ref_rows = ref.greedy(case["text_ids"], new_tokens, images=shown, image_pad=pad)
    our_tokens = [int(t) for t in got[f"ip{k}.greedy_tokens"]]
    n = _compared_steps(our_tokens, ref_tokens)
    return [
        {**tag, **_rows("image_prompt", ours, ref_logits)},
        {
            **tag,
            **_rows("image_greedy", got[f"ip{k}.greedy_logits"][:n], ref_rows[:n]),
            "greedy_agree": our_tokens == ref_tokens,
            "tokens_ours": our_tokens,
            "tokens_ref": ref_tokens,
        },
    ]


def _quantization_cost(model: Model, reference: Path, prompts: list[list[int]]) -> dict:
    """What quantization costs: the quantized build against transformers on the
    ORIGINAL weights, over every prompt position: top-1 agreement and the KL
    divergence KL(p_ref || p_ours) of the next-token distributions (nats)."""
    from .reference import Reference

    ref = Reference(reference)
    kls, agree = [], []
    for ids in prompts:
        ours, theirs = model.logits(ids).astype(np.float64), ref.logits(ids)[0].astype(np.float64)
        log_p = theirs - theirs.max(-1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
        log_q = ours - ours.max(-1, keepdims=True)
        log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
        kls.extend((np.exp(log_p) * (log_p - log_q)).sum(-1))
        agree.extend(ours.argmax(-1) == theirs.argmax(-1))
    return {
        "against": "transformers on the original (unquantized) weights, float32",
        "positions": len(kls),
        "top1_agreement": float(np.mean(agree)),
        "kl_mean": float(np.mean(kls)),
        "kl_max": float(np.max(kls)),
    }


def write_report(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=1) + "\n")
