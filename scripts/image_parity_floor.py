"""Where the fp32 image-prompt tolerance comes from: how far transformers' own
fp32 run is from its fp64 run on the parity's image prompts, beside how far
our build is from that fp64 run, per case, split into image-token positions
and text positions.

    .venv/bin/python scripts/image_parity_floor.py ARTIFACT CHECKPOINT

ARTIFACT: a host q0f32 build of CHECKPOINT (with the vision tower), e.g.
``qwen35-mobile make-checkpoint --preset tiny -o ck && qwen35-mobile compile
--model ck -o art``.  docs/vision.md has the figures.
"""

from __future__ import annotations

import argparse
import os
import platform

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from qwen35_mobile.bindings.image import prepare
    from qwen35_mobile.bindings.model import Model
    from qwen35_mobile.parity.reference import Reference
    from qwen35_mobile.parity.report import collect_ours, image_prompts, parity_images

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("artifact")
    parser.add_argument("checkpoint")
    args = parser.parse_args()

    model = Model.load(args.artifact)
    contract = model.engine.image
    if contract is None or model.manifest["dtype"] != "float32":
        raise SystemExit("needs an fp32 build with the vision tower")
    images = parity_images()
    pixels = [prepare(image, contract["resize"]) for image in images]
    pad = contract["tokens"]["image_pad"]
    ref32, ref64 = Reference(args.checkpoint), Reference(args.checkpoint)
    ref64.model = ref64.model.double()

    def rel(x, exact):  # max |x - exact| / max |exact| per position
        return np.abs(x.astype(np.float64) - exact).max(-1) / np.abs(exact).max(-1)

    print(f"machine: {platform.machine()} {platform.processor() or ''}".strip())
    print(
        "| case | ours vs fp64: image / text positions | transformers fp32 vs fp64: image / text |"
    )
    print("|---|---|---|")
    cases = image_prompts(model.tokenizer, pixels, contract)
    got = collect_ours(model.engine, [], 1, images=pixels, image_cases=cases)
    for k, case in enumerate(cases):
        shown = [images[i] for which in case["images"] for i in which]
        exact, _ = ref64.logits(case["text_ids"], images=shown, image_pad=pad)
        theirs, _ = ref32.logits(case["text_ids"], images=shown, image_pad=pad)
        ours = got[f"ip{k}.logits"]
        is_image = np.array([t for turn in case["turns"] for t in turn]) == pad
        a, b = rel(ours, exact), rel(theirs, exact)
        print(
            f"| {case['name']} | {a[is_image].max():.2e} / {a[~is_image].max():.2e} "
            f"| {b[is_image].max():.2e} / {b[~is_image].max():.2e} |"
        )


if __name__ == "__main__":
    main()
