"""Several model functions in one library (compile/pipeline.py): ``Exported``
holds its entry points by name, the text decoder's first; another one joins
without touching the decoder's functions or parameters."""

from __future__ import annotations

import pytest

from qwen35_mobile.compile import pipeline
from qwen35_mobile.compile.config import PRESETS
from qwen35_mobile.compile.pipeline import TEXT, VISION, EntryPoint

DECODER = [
    "embed",
    "prefill",
    "prefill_all_logits",
    "decode",
    "create_paged_kv_cache",
    "create_rnn_state",
]


def test_parameters_are_the_decoders_then_the_towers():
    exported = pipeline.parameters(PRESETS["tiny"], "q0f32")
    assert list(exported.entry_points) == [TEXT, VISION]
    text, tower = exported.entry_points[TEXT], exported.entry_points[VISION]
    assert exported.params == text.params + tower.params and exported.functions == []
    assert all(p[0].startswith("visual.") for p in tower.params)
    assert list(exported.expected()) == [name for name, _, _ in exported.params]
    text_only = pipeline.parameters(PRESETS["tiny"], "q0f32", vision=False)
    assert list(text_only.entry_points) == [TEXT] and text_only.params == text.params


def test_another_entry_point_adds_its_functions_and_parameters():
    exported = pipeline.parameters(PRESETS["tiny"], "q0f32", vision=False)
    decoder = list(exported.params)
    embed = next(p for p in decoder if p[0] == "embed_tokens.weight")
    vision = EntryPoint(["image_embed"], [("visual.proj.weight", (64, 48), "float32"), embed])
    exported.add_entry_point("vision", vision)
    assert list(exported.entry_points) == [TEXT, "vision"]
    assert exported.functions == ["image_embed"]
    # the library's parameters: the decoder's, as they were, then the new ones; a shared one once
    assert exported.params == [*decoder, ("visual.proj.weight", (64, 48), "float32")]
    assert exported.entry_points[TEXT].params == decoder

    with pytest.raises(ValueError, match="entry point 'vision' is already exported"):
        exported.add_entry_point("vision", EntryPoint([], []))
    with pytest.raises(ValueError, match=r"functions \['image_embed'\] are already exported"):
        exported.add_entry_point("video", EntryPoint(["image_embed"], []))
    with pytest.raises(ValueError, match="parameter .*'embed_tokens.weight'.* differs"):
        exported.add_entry_point("mtp", EntryPoint(["mtp"], [(embed[0], (1, 64), "float32")]))
    with pytest.raises(ValueError, match="a module joins a module"):
        exported.add_entry_point("video", EntryPoint(["video_embed"], []), mod=object())
    assert list(exported.entry_points) == [TEXT, "vision"]  # nothing half-added


def _vision_module(name: str):
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Vision:
        @R.function
        def image_embed(
            pixels: R.Tensor((4, 48), "float32"), params: R.Tuple(R.Tensor((48, 64), "float32"))
        ) -> R.Tensor((4, 64), "float32"):
            return R.matmul(pixels, params[0])

    mod = Vision
    if name != "image_embed":  # the same function under another global name
        gv = mod.get_global_var("image_embed")
        func = mod[gv].with_attr("global_symbol", name)
        import tvm

        mod = tvm.IRModule({tvm.ir.GlobalVar(name): func})
    return mod


def test_a_module_joins_the_decoders_export():
    from conftest import need_module

    need_module("tvm")
    from qwen35_mobile.targets import get_target

    exported = pipeline.export(PRESETS["tiny"], "q0f32", get_target("host"))
    assert list(exported.entry_points) == [TEXT] and exported.functions == DECODER
    before = {gv.name_hint: exported.mod[gv] for gv in exported.mod.get_global_vars()}
    params = list(exported.params)

    with pytest.raises(
        ValueError, match=r"the module defines \['embed'\], which are already defined"
    ):
        exported.add_entry_point(
            "vision", EntryPoint(["vision_embed"], []), mod=_vision_module("embed")
        )
    proj = ("visual.proj.weight", (48, 64), "float32")
    exported.add_entry_point(
        "vision", EntryPoint(["image_embed"], [proj]), mod=_vision_module("image_embed")
    )

    assert exported.functions == [*DECODER, "image_embed"]
    assert exported.params == [*params, proj]
    after = {gv.name_hint: exported.mod[gv] for gv in exported.mod.get_global_vars()}
    assert set(after) == set(before) | {"image_embed"}
    assert all(
        after[name].same_as(func) for name, func in before.items()
    )  # the decoder's, untouched
