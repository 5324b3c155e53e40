import json
import re

import pytest

from qwen35_mobile.compile.config import (
    FULL,
    LINEAR,
    PRESETS,
    ConfigError,
    Qwen35Config,
    VisionConfig,
    from_hf_dict,
    load_config,
    preset,
    resolve_model,
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


# ---- the vision tower's config --------------------------------------------------

# A vision_config as save_pretrained writes it (the 0.8B sizes), with the older
# model_type that transformers still reads and fields the tower does not depend on.
PUBLISHED_VISION = {
    "deepstack_visual_indexes": [],
    "depth": 12,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_size": 768,
    "in_channels": 3,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "model_type": "qwen3_5",
    "num_heads": 12,
    "num_position_embeddings": 2304,
    "out_hidden_size": 1024,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


def test_vision_config_parses_a_published_config():
    v = VisionConfig.from_json(PUBLISHED_VISION)
    assert v == PRESETS["qwen3.5-0.8b"].vision
    assert (v.depth, v.hidden_size, v.num_heads, v.head_dim, v.grid_side) == (12, 768, 12, 64, 48)
    d = PRESETS["qwen3.5-0.8b"].hf_config_dict()
    d["vision_config"] = PUBLISHED_VISION
    assert from_hf_dict(d) == PRESETS["qwen3.5-0.8b"]


def test_vision_config_round_trips():
    for name in ("tiny", "qwen3.5-0.8b", "qwen3.5-2b", "qwen3.5-4b", "qwen3.5-9b"):
        c = PRESETS[name]
        assert isinstance(c.vision, VisionConfig)
        assert VisionConfig.from_json(c.vision.to_json()) == c.vision
        assert c.vision.to_json()["model_type"] == "qwen3_5_vision"
        # the manifest's config, through JSON, and the config.json
        assert Qwen35Config.from_json(json.loads(json.dumps(c.to_json()))) == c
        assert c.to_json()["vision"] == c.hf_config_dict()["vision_config"] == c.vision.to_json()
    assert Qwen35Config.from_json(PRESETS["tiny"].replace(vision=None).to_json()).vision is None


def test_vision_config_defaults_what_the_family_shares():
    required = {k: PUBLISHED_VISION[k] for k in VisionConfig.REQUIRED}
    assert VisionConfig.from_json(required) == PRESETS["qwen3.5-0.8b"].vision


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda v: v.pop("depth"), "'vision_config.depth' is missing"),  # missing
        (
            lambda v: v.update(num_heads="12"),
            "'vision_config.num_heads' must be a positive integer, got '12'",
        ),  # str
        (
            lambda v: v.update(patch_size=[16, 16]),
            "'vision_config.patch_size' must be a positive integer",
        ),  # list
        (
            lambda v: v.update(depth=True),
            "'vision_config.depth' must be a positive integer, got True",
        ),  # bool
        (
            lambda v: v.update(hidden_size=768.0),
            "'vision_config.hidden_size' must be a positive integer",
        ),  # float
        (
            lambda v: v.update(in_channels=0),
            "'vision_config.in_channels' must be a positive integer, got 0",
        ),
        (lambda v: v.update(hidden_act=None), "'vision_config.hidden_act' must be a string"),
        (lambda v: v.update(hidden_act="gelu"), "'vision_config.hidden_act' is 'gelu'"),
        (
            lambda v: v.update(num_heads=10),
            "'vision_config.hidden_size' (768) is not a multiple of",
        ),
        (
            lambda v: v.update(num_position_embeddings=2300),
            "'vision_config.num_position_embeddings' (2300)",
        ),
        (lambda v: v.update(model_type="siglip"), "'vision_config.model_type' is 'siglip'"),
        (
            lambda v: v.update(deepstack_visual_indexes=[5, 11]),
            "'vision_config.deepstack_visual_indexes'",
        ),
        (
            lambda v: v.update(out_hidden_size=2048),
            "'vision_config.out_hidden_size' (2048) differs",
        ),
    ],
)
def test_bad_vision_configs_name_the_field(edit, message):
    d = PRESETS["qwen3.5-0.8b"].hf_config_dict()
    d["vision_config"] = dict(PUBLISHED_VISION)
    edit(d["vision_config"])
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_hf_dict(d)


def test_vision_config_must_be_an_object(tmp_path):
    d = PRESETS["tiny"].hf_config_dict()
    d["vision_config"] = [1, 2]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(
        ConfigError, match=r"config\.json: config field 'vision_config' must be an object"
    ):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="must be a VisionConfig"):
        PRESETS["tiny"].replace(vision=PUBLISHED_VISION)
