"""Random-weight checkpoints: the real Hugging Face layout, loaded by transformers."""

import json
import math
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import need_module  # noqa: E402

from qwen35_mobile.compile.config import PRESETS  # noqa: E402
from qwen35_mobile.parity import checkpoint as ckpt  # noqa: E402

torch = need_module("torch")
transformers = need_module("transformers")

TEST_PRESETS = ["tiny", "tiny-gva", "tiny-untied"]
MTP_NAMES = {
    "mtp.fc.weight",
    "mtp.pre_fc_norm_embedding.weight",
    "mtp.pre_fc_norm_hidden.weight",
    "mtp.norm.weight",
    *(
        f"mtp.layers.0.{n}.weight"
        for n in [
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "self_attn.q_norm",
            "self_attn.k_norm",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
    ),
}


def _read(directory):
    """Every tensor of a checkpoint directory (one file or shards) as numpy."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="np") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def _reference_shapes(config):
    """Names and shapes of transformers' own model for this config."""
    with torch.device("meta"):
        model = transformers.Qwen3_5ForConditionalGeneration(
            transformers.Qwen3_5Config(**config.hf_config_dict())
        )
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        del shapes["lm_head.weight"]
    return shapes


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Each test preset written once, float32, seed 0."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: ckpt.write_checkpoint(PRESETS[name], root / name) for name in TEST_PRESETS}


@pytest.mark.parametrize("name", TEST_PRESETS)
def test_tensor_names_and_shapes_match_transformers(written, name):
    config = PRESETS[name]
    tensors = _read(written[name])
    mtp = {k: v.shape for k, v in tensors.items() if k.startswith("mtp.")}
    assert set(mtp) == MTP_NAMES
    h = config.hidden_size
    assert mtp["mtp.fc.weight"] == (h, 2 * h)
    assert mtp["mtp.layers.0.self_attn.q_proj.weight"] == (
        2 * config.num_attention_heads * config.head_dim,
        h,
    )
    assert {k: v.shape for k, v in tensors.items() if k not in mtp} == _reference_shapes(config)
    assert ("lm_head.weight" in tensors) == (not config.tie_word_embeddings)
    assert {v.dtype for v in tensors.values()} == {np.dtype(np.float32)}
    assert sorted(p.name for p in written[name].iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


@pytest.mark.parametrize("name", ["qwen3.5-0.8b", "qwen3.5-2b", "qwen3.5-4b", "qwen3.5-9b"])
def test_real_size_layouts_match_transformers(name):
    config = PRESETS[name]
    specs = ckpt.tensor_specs(config)
    assert {k: s.shape for k, s in specs.items() if not k.startswith("mtp.")} == _reference_shapes(
        config
    )
    assert {k for k in specs if k.startswith("mtp.")} == MTP_NAMES


@pytest.mark.parametrize("name", TEST_PRESETS)
def test_transformers_loads_every_tensor(written, name):
    model, info = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(
        written[name], output_loading_info=True, local_files_only=True
    )
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()
    assert all(k.startswith("mtp.") for k in info["unexpected_keys"])
    tensors = _read(written[name])
    state = model.state_dict()
    if PRESETS[name].tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.language_model.embed_tokens.weight"]
    assert set(state) == {k for k in tensors if not k.startswith("mtp.")}
    for key, value in state.items():
        assert np.array_equal(value.numpy(), tensors[key]), key


@pytest.mark.parametrize("name", TEST_PRESETS)
def test_forward_is_finite_and_not_degenerate(written, name):
    model = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(
        written[name], local_files_only=True
    )
    ids = torch.randint(0, 248000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        changed = ids.clone()
        changed[:, 0] = (changed[:, 0] + 1) % 248000
        logits_changed = model(input_ids=changed).logits
    logits = out.logits
    assert torch.isfinite(logits).all()
    assert 2.0 < logits.std().item() < 8.0
    for hidden in out.hidden_states:  # the residual stream stays O(1)
        assert 0.2 < hidden.pow(2).mean().sqrt().item() < 10.0
    top2 = logits.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    assert margin.std().item() > 0.1  # the top-1 margin varies
    argmax = logits.argmax(-1)
    assert (
        argmax.unique().numel() > 16 and (argmax == ids).float().mean() < 0.2
    )  # not a copy of the input
    assert (
        logits_changed[:, -1] - logits[:, -1]
    ).abs().max() > 0.1  # the last position sees the first


def test_random_values_follow_the_recipe(written):
    config = PRESETS["tiny"]
    t = _read(written["tiny"])
    lin = next(i for i, kind in enumerate(config.layer_types) if kind == "linear_attention")
    prefix = f"model.language_model.layers.{lin}.linear_attn."
    a_log = t[prefix + "A_log"]
    assert a_log.shape == (config.linear_num_value_heads,) and np.all(
        (a_log >= 0) & (a_log <= math.log(16))
    )
    assert t[prefix + "conv1d.weight"].shape == (config.conv_dim, 1, config.linear_conv_kernel_dim)
    assert abs(t[prefix + "norm.weight"].mean() - 1) < 0.2  # gated norm: plain weight near 1
    norm = t["model.language_model.norm.weight"]  # zero-centred norms: randomised, near 0
    assert 0.03 < norm.std() < 0.3 and abs(norm.mean()) < 0.1
    embed = t["model.language_model.embed_tokens.weight"]
    assert abs(embed.std() - 4 / math.sqrt(config.hidden_size)) < 0.01
    assert t["model.visual.blocks.0.attn.qkv.bias"].std() > 0.01


def test_sharded_write_loads_identically(written, tmp_path):
    config = PRESETS["tiny-untied"]
    out = ckpt.write_checkpoint(config, tmp_path / "sharded", max_shard_bytes=4 << 20)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and files == sorted(set(index["weight_map"].values()))
    assert all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    assert not (out / "model.safetensors").exists()
    single, sharded = _read(written["tiny-untied"]), _read(out)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in sharded.values())
    assert set(index["weight_map"]) == set(single) == set(sharded)
    assert all(np.array_equal(single[k], sharded[k]) for k in single)
    a = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(
        written["tiny-untied"], local_files_only=True
    )
    b = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(out, local_files_only=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_deterministic_per_seed(written, tmp_path):
    again = ckpt.write_checkpoint(PRESETS["tiny"], tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (
        written["tiny"] / "model.safetensors"
    ).read_bytes()
    other = _read(ckpt.write_checkpoint(PRESETS["tiny"], tmp_path / "seed1", seed=1))
    base = _read(written["tiny"])
    assert not np.array_equal(
        other["model.language_model.norm.weight"], base["model.language_model.norm.weight"]
    )


@pytest.mark.parametrize("dtype, code", [("bfloat16", "BF16"), ("float16", "F16")])
def test_half_precision(written, tmp_path, dtype, code):
    out = ckpt.write_checkpoint(PRESETS["tiny"], tmp_path / dtype, dtype=dtype)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == dtype
    raw = (out / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {code}
    model = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(out, local_files_only=True)
    assert model.dtype == getattr(torch, dtype)
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    reference = _read(written["tiny"])[name].astype(
        {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    )
    assert np.array_equal(model.state_dict()[name].float().numpy(), reference.astype(np.float32))


def test_config_and_generation_config(written):
    config = json.loads((written["tiny"] / "config.json").read_text())
    assert (
        config["architectures"] == ["Qwen3_5ForConditionalGeneration"]
        and config["dtype"] == "float32"
    )
    assert config["text_config"]["hidden_size"] == 64 and config["vision_config"]["depth"] == 1
    gen = json.loads((written["tiny"] / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [248046, 248044]
    hf = transformers.GenerationConfig.from_pretrained(written["tiny"], local_files_only=True)
    assert hf.eos_token_id == [248046, 248044] and not hf.do_sample


def test_tokenizer_files_load(written):
    directory = written["tiny"]
    auto = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    text = "<|im_start|>user\nHello, 世界! 🙂<|im_end|>"
    assert (
        auto.encode(text, add_special_tokens=False)
        == ckpt.tokenizer.load_tokenizer(directory).encode(text).ids
    )
    assert auto.encode(text, add_special_tokens=False)[0] == 248045


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.write_checkpoint(PRESETS["tiny"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    with pytest.raises(FileExistsError):
        ckpt.write_checkpoint(PRESETS["tiny"], tmp_path / "out")
    assert (tmp_path / "out" / "x").read_text() == "keep"
    with pytest.raises(ValueError, match="dtype"):
        ckpt.write_checkpoint(PRESETS["tiny"], tmp_path / "new", dtype="int8")


def test_ensure_checkpoint_caches(tmp_path, monkeypatch):
    progress = []
    real_write = ckpt.write_checkpoint

    def recording_write(*args, **kwargs):
        return real_write(
            *args, **kwargs, progress=lambda done, total: progress.append((done, total))
        )

    monkeypatch.setattr(ckpt, "write_checkpoint", recording_write)
    path = ckpt.ensure_checkpoint("tiny", tmp_path, dtype="bfloat16")
    assert (
        path.parent == tmp_path / "checkpoints" and "tiny" in path.name and "bfloat16" in path.name
    )
    assert (path / "model.safetensors").exists()
    assert (
        progress[-1][0]
        == progress[-1][1]
        == (path / "model.safetensors").stat().st_size - _header_bytes(path)
    )

    def no_write(*args, **kwargs):
        raise AssertionError("the cached checkpoint should be reused")

    monkeypatch.setattr(ckpt, "write_checkpoint", no_write)
    assert ckpt.ensure_checkpoint("tiny", tmp_path, dtype="bfloat16") == path
    with pytest.raises(AssertionError):
        ckpt.ensure_checkpoint("tiny", tmp_path, seed=1, dtype="bfloat16")


def _header_bytes(directory):
    raw = (directory / "model.safetensors").read_bytes()
    return 8 + int.from_bytes(raw[:8], "little")
