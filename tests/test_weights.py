"""Checkpoint reading and tensor-cache writing (compile/weights.py) on small
hand-made checkpoints laid out like the real Qwen3.5 ones."""

from __future__ import annotations

import hashlib
import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from qwen35_mobile.compile import weights as W
from qwen35_mobile.errors import UserError

MM = "model.language_model."
BF16 = ml_dtypes.bfloat16


def _text_tensors(rng: np.random.Generator, untied: bool = False) -> dict[str, np.ndarray]:
    """Our parameter name -> source array, mixing bf16, f16 and f32."""
    t = {
        "embed_tokens.weight": rng.standard_normal((64, 16), np.float32).astype(BF16),
        "layers.0.input_layernorm.weight": rng.standard_normal(16, np.float32),
        "layers.0.linear_attn.A_log": rng.standard_normal(4, np.float32),
        "layers.0.linear_attn.conv1d.weight": rng.standard_normal((24, 1, 4), np.float32).astype(
            np.float16
        ),
        "layers.0.mlp.up_proj.weight": rng.standard_normal((32, 16), np.float32).astype(BF16),
        "layers.0.mlp.down_proj.weight": rng.standard_normal((16, 32), np.float32),
        "norm.weight": rng.standard_normal(16, np.float32).astype(BF16),
    }
    if untied:
        t["lm_head.weight"] = rng.standard_normal((64, 16), np.float32).astype(BF16)
    return t


def _extra_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Vision tower and MTP head tensors, which the converter skips."""
    return {
        "model.visual.patch_embed.proj.weight": rng.standard_normal(
            (8, 3, 2, 2, 2), np.float32
        ).astype(BF16),
        "model.visual.blocks.0.attn.qkv.weight": rng.standard_normal((24, 8), np.float32).astype(
            BF16
        ),
        "model.visual.merger.norm.weight": rng.standard_normal(8, np.float32),
        "mtp.fc.weight": rng.standard_normal((16, 32), np.float32).astype(BF16),
        "mtp.norm.weight": rng.standard_normal(16, np.float32),
    }


def _hf(params: dict[str, np.ndarray], prefix: str = MM) -> dict[str, np.ndarray]:
    return {k if k == "lm_head.weight" else prefix + k: v for k, v in params.items()}


def _expected(
    params: dict[str, np.ndarray], dtype: str = "float32"
) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (v.shape, dtype) for k, v in params.items()}


def _write_sharded(ckpt_dir, tensors: dict[str, np.ndarray], n_files: int = 2) -> None:
    names = list(tensors)
    weight_map = {}
    for i in range(n_files):
        file = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::n_files]}
        save_file(part, str(ckpt_dir / file))
        weight_map.update(dict.fromkeys(part, file))
    total = sum(a.nbytes for a in tensors.values())
    (ckpt_dir / W.INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )


@pytest.fixture
def text():
    return _text_tensors(np.random.default_rng(0))


@pytest.fixture
def single(tmp_path, text):
    """A multimodal single-file checkpoint with visual and MTP tensors."""
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file({**_hf(text), **_extra_tensors(np.random.default_rng(1))}, str(d / W.SINGLE_FILE))
    return d


@pytest.fixture
def sharded(tmp_path, text):
    d = tmp_path / "sharded"
    d.mkdir()
    _write_sharded(d, {**_hf(text), **_extra_tensors(np.random.default_rng(1))})
    return d


# ---- reading checkpoints ------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_open_lists_tensors_and_maps_names(request, layout, text):
    ckpt = W.open_checkpoint(request.getfixturevalue(layout))
    assert len(ckpt.names()) == len(text) + 5
    info = ckpt.tensors[MM + "layers.0.mlp.up_proj.weight"]
    assert (info.dtype, info.shape) == ("BF16", (32, 16))
    assert ckpt.tensors[MM + "layers.0.linear_attn.conv1d.weight"].dtype == "F16"
    text_params = {p: h for p, h in ckpt.params.items() if not p.startswith("visual.")}
    assert text_params == {k: MM + k for k in text}
    assert len(ckpt.params) == len(text) + 3  # and the tower's three
    assert ckpt.skipped == {"mtp.": 2}
    assert ckpt.unmapped == []
    got = ckpt.get(MM + "embed_tokens.weight")
    assert got.dtype == BF16 and np.array_equal(
        got.view(np.uint16), text["embed_tokens.weight"].view(np.uint16)
    )


def test_bare_text_checkpoint(tmp_path, text):
    save_file(
        {**_hf(text, "model."), "mtp.fc.weight": np.zeros((2, 2), np.float32)},
        str(tmp_path / W.SINGLE_FILE),
    )
    ckpt = W.open_checkpoint(tmp_path)
    assert ckpt.params == {k: "model." + k for k in text}
    assert ckpt.hf_name("norm.weight") == "model.norm.weight"
    assert ckpt.skipped == {"mtp.": 1}
    # a parameter the checkpoint lacks is looked for in the layout its tensors use
    assert ckpt.hf_name("layers.9.mlp.up_proj.weight") == "model.layers.9.mlp.up_proj.weight"
    assert ckpt.hf_name("lm_head.weight") == "lm_head.weight"


# ---- the name table ---------------------------------------------------------------


def test_name_table_skips_the_mtp_head(single):
    assert W.not_compiled() == {
        "mtp.*": "multi-token-prediction head: weights skipped, not compiled yet",
    }
    assert W.not_compiled(vision=False) == {
        "mtp.*": "multi-token-prediction head: weights skipped, not compiled yet",
        "model.visual.*": "vision tower: built without it (compile --no-vision)",
    }
    ckpt = W.open_checkpoint(single)
    # every count in the summary's ``skipped`` is one of not_compiled's rows
    assert {prefix + "*" for prefix in ckpt.skipped} <= set(W.not_compiled())
    assert ckpt.hf_name("layers.9.mlp.up_proj.weight") == MM + "layers.9.mlp.up_proj.weight"
    assert ckpt.hf_name("lm_head.weight") == "lm_head.weight"  # top level, not under MM


def test_one_row_maps_the_vision_tower(single, text, tmp_path):
    """The vision tower's row maps its tensors to ``visual.*`` parameters, which
    convert like the decoder's; a build without the tower leaves them behind."""
    ckpt = W.open_checkpoint(single)
    assert ckpt.skipped == {"mtp.": 2} and ckpt.unmapped == []
    visual = {p: h for p, h in ckpt.params.items() if p.startswith("visual.")}
    assert visual == {
        "visual.patch_embed.proj.weight": "model.visual.patch_embed.proj.weight",
        "visual.blocks.0.attn.qkv.weight": "model.visual.blocks.0.attn.qkv.weight",
        "visual.merger.norm.weight": "model.visual.merger.norm.weight",
    }
    assert ckpt.hf_name("visual.blocks.1.mlp.weight") == "model.visual.blocks.1.mlp.weight"
    text_only = W.convert_checkpoint(ckpt, _expected(text), tmp_path / "text-only")
    assert text_only["num_tensors"] == len(text)
    expected = _expected(text)
    expected.update({p: (ckpt.tensors[h].shape, "float32") for p, h in visual.items()})
    summary = W.convert_checkpoint(ckpt, expected, tmp_path / "out")
    assert summary["skipped"] == {"mtp.": 2} and summary["num_tensors"] == len(text) + 3
    got = W.load_tensor_cache(tmp_path / "out", ["visual.merger.norm.weight"])[0]
    assert np.array_equal(got, ckpt.get("model.visual.merger.norm.weight"))


def test_two_tensors_for_one_parameter_refused(tmp_path, text):
    tensors = {**_hf(text), "model.norm.weight": np.zeros(16, np.float32)}
    save_file(tensors, str(tmp_path / W.SINGLE_FILE))
    with pytest.raises(UserError, match="both map to parameter 'norm.weight'"):
        W.open_checkpoint(tmp_path)


def test_no_checkpoint_files(tmp_path):
    with pytest.raises(UserError, match="neither model.safetensors nor"):
        W.open_checkpoint(tmp_path)


def test_corrupt_header_named(single):
    file = single / W.SINGLE_FILE
    data = bytearray(file.read_bytes())
    data[8] = ord("#")  # the header's opening brace
    file.write_bytes(bytes(data))
    with pytest.raises(
        UserError, match=r"model\.safetensors: safetensors header is not valid JSON"
    ):
        W.open_checkpoint(single)


def test_header_length_past_end_named(single):
    file = single / W.SINGLE_FILE
    data = file.read_bytes()
    file.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    with pytest.raises(UserError, match=r"model\.safetensors: header length \d+ does not fit"):
        W.open_checkpoint(single)


def test_truncated_safetensors_named(sharded):
    file = sharded / "model-00002-of-00002.safetensors"
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"model-00002-of-00002\.safetensors: truncated"):
        W.open_checkpoint(sharded)


def test_index_missing_shard_named(sharded):
    (sharded / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(
        UserError, match=r"index\.json: shard 'model-00001-of-00002\.safetensors' .* does not exist"
    ):
        W.open_checkpoint(sharded)


def test_index_names_tensor_absent_from_shard(sharded):
    index = json.loads((sharded / W.INDEX_FILE).read_text())
    index["weight_map"]["model.language_model.ghost.weight"] = "model-00001-of-00002.safetensors"
    (sharded / W.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(
        UserError, match="maps 'model.language_model.ghost.weight' to 'model-00001-of-00002"
    ):
        W.open_checkpoint(sharded)


# ---- conversion -----------------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_round_trip_to_float32_is_exact(request, layout, text, tmp_path):
    ckpt = W.open_checkpoint(request.getfixturevalue(layout))
    calls = []
    summary = W.convert_checkpoint(
        ckpt, _expected(text), tmp_path / "out", progress=lambda *a: calls.append(a)
    )
    got = W.load_tensor_cache(tmp_path / "out")
    assert list(got) == list(text)
    for name, src in text.items():
        assert got[name].dtype == np.float32
        assert np.array_equal(got[name], src.astype(np.float32)), name  # bf16/f16 -> f32 is exact
    assert calls == [(i + 1, len(text), name) for i, name in enumerate(text)]
    n = sum(a.size for a in text.values())
    assert summary == {
        "num_tensors": len(text),
        "num_params": n,
        "nbytes": 4 * n,
        "num_shards": 1,
        "skipped": {"mtp.": 2, "model.visual.": 3},  # the tower: left behind (no visual.* expected)
        "ignored": [],
    }
    meta = json.loads((tmp_path / "out" / W.CACHE_FILE).read_text())["metadata"]
    assert meta == {"ParamSize": len(text), "ParamBytes": 4 * n, "BitsPerParam": 32.0}


def test_float16_target_matches_numpy_cast(single, text, tmp_path):
    expected = _expected(text, "float16")
    expected["layers.0.linear_attn.A_log"] = (expected["layers.0.linear_attn.A_log"][0], "float32")
    W.convert_checkpoint(W.open_checkpoint(single), expected, tmp_path)
    names = list(text)[::-1]
    got = W.load_tensor_cache(tmp_path, names)
    for name, array in zip(names, got):
        want = text[name].astype(expected[name][1])
        assert array.dtype == want.dtype and np.array_equal(array, want), name


def test_tvmjs_reads_our_cache(single, text, tmp_path):
    from conftest import need_module

    tvm = need_module("tvm")
    from tvm.contrib import tvmjs

    W.convert_checkpoint(W.open_checkpoint(single), _expected(text, "float16"), tmp_path)
    params, meta = tvmjs.load_tensor_cache(str(tmp_path), tvm.cpu())
    assert meta["ParamSize"] == len(text)
    for name, src in text.items():
        assert np.array_equal(params[name].numpy(), src.astype(np.float16)), name


def test_shard_size_limit(tmp_path):
    rng = np.random.default_rng(2)
    params = {
        f"layers.{i}.mlp.up_proj.weight": rng.standard_normal((i + 1, 100), np.float32)
        for i in range(12)
    }
    params["embed_tokens.weight"] = rng.standard_normal((40, 100), np.float32)  # 16000 bytes > cap
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file(_hf(params), str(d / W.SINGLE_FILE))
    cap = 4000
    W.convert_checkpoint(W.open_checkpoint(d), _expected(params), tmp_path / "out", shard_bytes=cap)
    shards = json.loads((tmp_path / "out" / W.CACHE_FILE).read_text())["records"]
    assert len(shards) > 3
    for shard in shards:
        data = (tmp_path / "out" / shard["dataPath"]).read_bytes()
        assert shard["format"] == "raw-shard" and len(data) == shard["nbytes"]
        assert shard["md5sum"] == hashlib.md5(data).hexdigest()
        assert len(data) <= cap or len(shard["records"]) == 1
        offset = 0
        for rec in shard["records"]:
            assert (
                rec["format"] == "raw" and rec["byteOffset"] == offset and rec["dtype"] == "float32"
            )
            offset += rec["nbytes"]
        assert offset == len(data)
    assert any(
        s["records"][0]["name"] == "embed_tokens.weight" and s["nbytes"] == 16000 for s in shards
    )
    got = W.load_tensor_cache(tmp_path / "out")
    assert all(np.array_equal(got[k], v) for k, v in params.items())

    # A rerun with a larger cap leaves no stale shard behind.
    W.convert_checkpoint(W.open_checkpoint(d), _expected(params), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "params_shard_0.bin",
        W.CACHE_FILE,
    ]


def test_tied_model_ignores_lm_head(tmp_path):
    rng = np.random.default_rng(3)
    untied = _text_tensors(rng, untied=True)
    save_file(_hf(untied), str(tmp_path / W.SINGLE_FILE))
    ckpt = W.open_checkpoint(tmp_path)
    tied = {k: v for k, v in untied.items() if k != "lm_head.weight"}
    summary = W.convert_checkpoint(ckpt, _expected(tied), tmp_path / "tied")
    assert summary["ignored"] == ["lm_head.weight"] and summary["num_tensors"] == len(tied)
    W.convert_checkpoint(ckpt, _expected(untied), tmp_path / "untied")
    head = W.load_tensor_cache(tmp_path / "untied", ["lm_head.weight"])[0]
    assert np.array_equal(head, untied["lm_head.weight"].astype(np.float32))


def test_untied_model_needs_lm_head(single, text, tmp_path):
    expected = {**_expected(text), "lm_head.weight": ((64, 16), "float32")}
    with pytest.raises(UserError, match="lacks tensor 'lm_head.weight'"):
        W.convert_checkpoint(W.open_checkpoint(single), expected, tmp_path)


def test_missing_tensor_named(single, text, tmp_path):
    expected = {**_expected(text), "layers.0.mlp.gate_proj.weight": ((32, 16), "float32")}
    with pytest.raises(
        UserError, match="lacks tensor 'model.language_model.layers.0.mlp.gate_proj.weight'"
    ):
        W.convert_checkpoint(W.open_checkpoint(single), expected, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_wrong_shape_named(single, text, tmp_path):
    expected = {**_expected(text), "layers.0.mlp.up_proj.weight": ((16, 32), "float32")}
    msg = "tensor 'model.language_model.layers.0.mlp.up_proj.weight' has shape (32, 16) but the config expects (16, 32)"
    with pytest.raises(UserError) as e:
        W.convert_checkpoint(W.open_checkpoint(single), expected, tmp_path)
    assert str(e.value) == msg


def test_extra_text_tensor_named(single, text, tmp_path):
    expected = {k: v for k, v in _expected(text).items() if k != "norm.weight"}
    with pytest.raises(UserError, match="does not use: 'model.language_model.norm.weight'"):
        W.convert_checkpoint(W.open_checkpoint(single), expected, tmp_path)


def test_int_tensor_refused(tmp_path, text):
    tensors = {**_hf(text), MM + "norm.weight": np.ones(16, np.int32)}
    save_file(tensors, str(tmp_path / W.SINGLE_FILE))
    with pytest.raises(UserError, match="tensor 'model.language_model.norm.weight' has dtype I32"):
        W.convert_checkpoint(W.open_checkpoint(tmp_path), _expected(text), tmp_path / "out")


def test_float16_overflow_refused(tmp_path, text):
    tensors = {**_hf(text), MM + "norm.weight": np.full(16, 1e5, np.float32)}
    save_file(tensors, str(tmp_path / W.SINGLE_FILE))
    with pytest.raises(
        UserError, match="'model.language_model.norm.weight' has values beyond the float16 range"
    ):
        W.convert_checkpoint(
            W.open_checkpoint(tmp_path), _expected(text, "float16"), tmp_path / "out"
        )


# ---- reading the tensor cache -------------------------------------------------


@pytest.fixture
def cache(single, text, tmp_path):
    out = tmp_path / "cache"
    W.convert_checkpoint(W.open_checkpoint(single), _expected(text), out, shard_bytes=1024)
    return out


def test_flipped_byte_detected_and_named(cache, text):
    shard = cache / "params_shard_1.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"params_shard_1\.bin: md5 mismatch"):
        W.load_tensor_cache(cache)
    unverified = W.load_tensor_cache(cache, verify=False)
    assert any(not np.array_equal(unverified[k], v.astype(np.float32)) for k, v in text.items())


def test_truncated_shard_detected_and_named(cache):
    shard = cache / "params_shard_0.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(
        UserError, match=r"params_shard_0\.bin: \d+ bytes but tensor-cache\.json records \d+"
    ):
        W.load_tensor_cache(cache, verify=False)


def test_missing_shard_named(cache):
    (cache / "params_shard_2.bin").unlink()
    with pytest.raises(UserError, match=r"params_shard_2\.bin: cannot read"):
        W.load_tensor_cache(cache)


def test_names_in_order(cache, text):
    with pytest.raises(UserError, match="tensor cache lacks 'nope'"):
        W.load_tensor_cache(cache, ["norm.weight", "nope"])
    norm, embed = W.load_tensor_cache(cache, ["norm.weight", "embed_tokens.weight"])
    assert np.array_equal(norm, text["norm.weight"].astype(np.float32))
    assert np.array_equal(embed, text["embed_tokens.weight"].astype(np.float32))


def test_no_cache(tmp_path):
    with pytest.raises(UserError, match="no tensor-cache.json"):
        W.load_tensor_cache(tmp_path)
