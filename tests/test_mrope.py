"""Images inside prompts: M-RoPE positions and the shift kernel against
transformers, images through Model.generate, and the bad-input cases.

The end-to-end parity of image prompts (every position, two images, a second
turn, greedy) runs inside tests/test_parity.py's run_parity cases for every
quantization; this file pins the parts it rests on and a negative control."""

from __future__ import annotations

import numpy as np
import pytest

from qwen35_mobile.bindings.engine import _image_runs
from qwen35_mobile.bindings.model import Model, chat_prompt
from qwen35_mobile.compile.config import preset
from qwen35_mobile.compile.model.qwen35 import mrope_shift_compute
from qwen35_mobile.errors import UserError
from qwen35_mobile.parity.report import (
    CRITERIA,
    _image_prompt_cases,
    collect_ours,
    image_prompts,
    parity_images,
)


@pytest.fixture(scope="module")
def tiny(artifact):
    return Model.load(artifact("tiny", "q0f32"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    from qwen35_mobile.parity.reference import Reference

    return Reference(checkpoint("tiny"))


def _transformers_rotation(x: np.ndarray, positions: np.ndarray, c) -> np.ndarray:
    """transformers' Qwen3_5 rotary embedding + apply_rotary_pos_emb on x [s, h, d]
    at 3-D positions [3, s], in torch (the reference's own code)."""
    import torch
    from transformers.models.qwen3_5 import modeling_qwen3_5 as m

    hf = m.Qwen3_5TextConfig(
        head_dim=c.head_dim,
        num_attention_heads=x.shape[1],
        hidden_size=c.hidden_size,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": c.rope_theta,
            "partial_rotary_factor": c.partial_rotary_factor,
            "mrope_section": c.mrope_section,
            "mrope_interleaved": True,
        },
    )
    rope = m.Qwen3_5TextRotaryEmbedding(hf)
    t = torch.from_numpy(x)[None].transpose(1, 2)  # [1, h, s, d]
    cos, sin = rope(t, torch.from_numpy(positions)[:, None, :])
    q, _ = m.apply_rotary_pos_emb(t, t, cos, sin)
    return q.transpose(1, 2)[0].numpy()


@pytest.mark.parametrize("name", ["tiny", "qwen3.5-0.8b"])
def test_shift_kernel_is_transformers_mrope(name):
    """mrope_shift alone (compiled for the host) rotates by explicit 3-D
    positions exactly as transformers does, and copies bit for bit at offset 0."""
    import tvm
    from tvm import te

    c = preset(name)
    n, heads = 12, 2
    x_te = te.placeholder((1, n, heads, c.head_dim), "float32", name="x")
    off_te = te.placeholder((1, n, 3), "int32", name="off")
    func = te.create_prim_func([x_te, off_te, mrope_shift_compute(c)(x_te, off_te)])
    lib = tvm.compile(tvm.IRModule({"main": func}), target="llvm")

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, n, heads, c.head_dim)).astype(np.float32)
    # an image's positions: t fixed, h and w along a 3 x 4 grid, from position 100 on
    r, col = np.divmod(np.arange(n), 4)
    positions = np.stack([np.full(n, 100), 100 + r, 100 + col]).astype(np.int64)

    def run(offsets):
        out = tvm.runtime.tensor(np.zeros_like(x))
        lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(offsets.astype(np.int32)), out)
        return out.numpy()

    got = run(positions.T[None])
    want = _transformers_rotation(x[0], positions, c)
    assert np.abs(got[0] - want).max() <= 1e-5 * np.abs(want).max()
    assert np.array_equal(run(np.zeros((1, n, 3))), x)  # offset 0: the value itself
    # negative control: positions shared by all three axes are a different rotation
    one_d = _transformers_rotation(x[0], np.stack([positions[0]] * 3), c)
    assert np.abs(got[0] - one_d).max() > 1e-2


def test_positions_are_get_rope_index(tiny, reference):
    """The engine's M-RoPE positions (offset + index) for text, two images and
    text after them, and a continued sequence, equal transformers' get_rope_index
    on the same tokens."""
    import torch

    engine = tiny.engine
    pad = engine.image["tokens"]["image_pad"]
    grids = [(2, 3), (4, 2)]  # token grids (rows, cols)
    ids = [1, 2, 3, *[pad] * 6, 4, 5, *[pad] * 8, 6, 7, 8]
    mm = torch.tensor([[int(t == pad) for t in ids]])
    thw = torch.tensor([[1, 2 * r, 2 * c] for r, c in grids])
    want, _ = reference.model.model.get_rope_index(torch.tensor([ids]), mm, thw)
    want = want[:, 0].numpy().T  # [n, 3]
    split = 11  # the second image and the text after it in a second call
    first_ids, second_ids = np.array(ids[:split]), np.array(ids[split:])
    seq = engine.add_sequence()
    try:
        first = engine._offsets(seq, split, _image_runs(first_ids, pad, grids[:1]))
        engine._lengths[seq] += split  # what the forward call does
        second = engine._offsets(seq, len(second_ids), _image_runs(second_ids, pad, grids[1:]))
    finally:
        engine.remove_sequence(seq)
    got = np.concatenate([first, second]) + np.arange(len(ids))[:, None]
    assert np.array_equal(got, want)
    assert (first[:3] == 0).all() and (second[-3:] != 0).all()  # text after images is shifted


def test_image_prompt_checker_fails_with_1d_positions(tiny, reference, monkeypatch):
    """Negative control of the image_prompt case: the same images and tokens with
    1-D positions (M-RoPE off) are measurably wrong, beyond the fp32 criterion."""
    engine = tiny.engine
    images = parity_images()
    pixels = tiny.prepare_images(images)
    cases = image_prompts(tiny.tokenizer, pixels, engine.image)[:1]
    monkeypatch.setattr(
        type(engine),
        "_offsets",
        lambda self, seq, n, runs: np.zeros((n, 3), np.int64),
    )
    got = collect_ours(engine, [], 2, images=pixels, image_cases=cases)
    pad = engine.image["tokens"]["image_pad"]
    (prompt, _) = _image_prompt_cases(got, 0, cases[0], reference, images, pad, 2)
    assert prompt["max_rel"] > 10 * CRITERIA["float32"]["max_rel"], prompt["max_rel"]


def test_generate_with_an_image_is_transformers_greedy(tiny, reference, tmp_path):
    """Model.generate(prompt, images=[file]) through the bindings: the reference's
    greedy tokens for the same rendered prompt and image."""
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.fromarray(parity_images()[1]).save(path)
    text = chat_prompt("What is in the picture?", images=1)
    pad = tiny.engine.image["tokens"]["image_pad"]
    want, _ = reference.greedy(tiny.encode(text), 6, images=[path], image_pad=pad)
    got = list(tiny.generate_ids(tiny.encode(text), 6, images=[path]))
    assert got == want[: len(got)] and len(got) >= 1
    reply = tiny.generate("What is in the picture?", 6, temperature=0, images=[path])
    assert reply == tiny.decode_tokens(got)


def test_image_input_errors(artifact, tiny):
    image = parity_images()[0]  # 256 x 320: 80 image tokens
    small = Model.load(artifact("tiny", "q0f32"), context_window=64)
    with pytest.raises(UserError, match=r"\(\d+ tokens, 1 image\(s\) included\).*context window"):
        list(small.generate_ids(small.encode(chat_prompt("Hi", images=1)), 4, images=[image]))
    assert small.engine.live_sequences() == []  # nothing started
    with pytest.raises(UserError, match="2 image\\(s\\) given, but the prompt has 1"):
        tiny.logits(tiny.encode(chat_prompt("Hi", images=1)), images=[image, image])
    with pytest.raises(UserError, match="run of image_pad tokens is"):
        pad = tiny.engine.image["tokens"]["image_pad"]
        seq = tiny.engine.add_sequence()
        try:
            tiny.engine.prefill(seq, [1, pad, pad, 2], images=[(np.zeros((6, 64)), (2, 3))])
        finally:
            tiny.engine.remove_sequence(seq)
    text_only = Model.load(artifact("tiny", "q0f32", vision=False))
    with pytest.raises(UserError, match="no vision tower"):
        text_only.generate("Hi", 4, images=[image])
