import re
import json

import pytest

from qwen35_mobile.compile.config import (
    FULL, LINEAR, PRESETS, ConfigError, from_hf_dict, load_config, preset, resolve_model,
)


def test_real_presets_match_the_architecture_doc():
    p = PRESETS["qwen3.5-0.8b"]
    assert (p.hidden_size, p.intermediate_size, p.num_hidden_layers) == (1024, 3584, 24)
    assert p.full_attention_layers == [3, 7, 11, 15, 19, 23]
    assert p.rotary_dim == 64 and p.mrope_section == [11, 11, 10]
    assert PRESETS["qwen3.5-4b"].linear_num_value_heads == 32
    assert not PRESETS["qwen3.5-9b"].tie_word_embeddings
    assert all(PRESETS[n].tie_word_embeddings for n in ("qwen3.5-0.8b", "qwen3.5-2b", "qwen3.5-4b"))
    # Rough size check: the names are the parameter counts (text part).
    assert 0.7e9 < p.num_params() < 0.8e9
    assert 8.5e9 < PRESETS["qwen3.5-9b"].num_params() < 9.5e9


def test_hf_round_trip_multimodal_and_bare_text():
    for name in ("tiny", "tiny-gva", "tiny-untied", "qwen3.5-9b"):
        c = PRESETS[name]
        assert from_hf_dict(c.hf_config_dict()) == c
        text = c.text_config_dict()
        assert from_hf_dict(text) == c.replace(vision=None)


def test_layer_types_are_honoured():
    d = PRESETS["tiny"].hf_config_dict()
    d["text_config"]["layer_types"] = [FULL, LINEAR, LINEAR, FULL]
    assert from_hf_dict(d).full_attention_layers == [0, 3]


def test_missing_rope_parameters_fall_back_to_theta_1e4_like_transformers():
    d = PRESETS["tiny"].text_config_dict()
    del d["rope_parameters"]
    assert from_hf_dict(d).rope_theta == 10000.0


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda t: t.update(num_key_value_heads=3), "num_attention_heads"),
        (lambda t: t.update(linear_num_value_heads=3), "linear_num_value_heads"),
        (lambda t: t.update(layer_types=["full_attention"] * 3), "layer_types"),
        (lambda t: t.update(layer_types=["sliding"] * 4), "layer_types[0]"),
        (lambda t: t.update(hidden_size=-1), "hidden_size"),
        (lambda t: t.pop("vocab_size"), "vocab_size"),
        (lambda t: t.update(hidden_act="gelu"), "hidden_act"),
        (lambda t: t["rope_parameters"].update(partial_rotary_factor=0.3), "partial_rotary_factor"),
    ],
)
def test_inconsistent_configs_name_the_field(edit, field):
    d = PRESETS["tiny"].hf_config_dict()
    edit(d["text_config"])
    with pytest.raises(ConfigError, match=re.escape(f"'{field}")):
        from_hf_dict(d)


def test_unknown_model_type_and_preset(tmp_path):
    with pytest.raises(ConfigError, match="model_type"):
        from_hf_dict({"model_type": "llama"})
    with pytest.raises(ConfigError, match="unknown preset 'qwen3.5-1b'"):
        preset("qwen3.5-1b")
    with pytest.raises(ConfigError, match="neither a preset"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny"].hf_config_dict()))
    assert resolve_model(str(tmp_path)) == (PRESETS["tiny"], tmp_path)
