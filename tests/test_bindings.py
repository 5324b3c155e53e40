"""The user-facing API: Model.load(...).generate / stream / logits."""

import numpy as np

from qwen35_mobile import Model
from qwen35_mobile.bindings.model import chat_prompt, sample
from qwen35_mobile.compile.config import IM_END_ID


def test_chat_template_thinking_on_and_off():
    off = chat_prompt("hi")
    assert off == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert chat_prompt("hi", thinking=True).endswith("<|im_start|>assistant\n<think>\n")
    assert chat_prompt("hi", system="be brief").startswith(
        "<|im_start|>system\nbe brief<|im_end|>\n"
    )


def test_sampling():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 3.0, 2.9, -1.0])
    assert sample(logits, rng, 0.0, 1.0, 0) == 1
    assert sample(logits, rng, 1.0, 1.0, 1) == 1  # top-k 1 is greedy
    assert sample(logits, rng, 1.0, 0.01, 0) == 1  # tiny top-p keeps the best only
    picks = {sample(logits, rng, 1.0, 1.0, 2) for _ in range(200)}
    assert picks == {1, 2}


def test_generate_stream_and_logits(artifact):
    m = Model.load(artifact("tiny"))
    text = m.generate("Hello", max_new_tokens=12, temperature=0)
    assert text == "".join(m.stream("Hello", max_new_tokens=12, temperature=0))
    assert m.generate("Hello", max_new_tokens=12, temperature=0.8, seed=3) == m.generate(
        "Hello", max_new_tokens=12, temperature=0.8, seed=3
    )
    ids = m.encode(chat_prompt("Hello"))
    greedy = list(m.generate_ids(ids, 12))
    assert m.decode_tokens(greedy) == text
    # logits of prompt + greedy continuation: each greedy token is the argmax of the previous row
    rows = m.logits(ids + greedy)
    assert rows.shape == (len(ids) + len(greedy), m.engine.vocab_size) and rows.dtype == np.float32
    assert list(rows[len(ids) - 1 : -1].argmax(-1)) == greedy


def test_stop_ids_end_generation(artifact):
    m = Model.load(artifact("tiny"))
    assert list(m.generate_ids([1, 2, 3], 10, pick=lambda _: IM_END_ID)) == []
    assert m.engine.live_sequences() == []  # the sequence was released
