import json

import pytest

from qwen35_mobile.compile.sizes import size_table, weight_bytes


@pytest.mark.parametrize("quant", ["q0f32", "q4f16_1"])
def test_computed_size_matches_the_artifact(quant, artifact):
    cache = json.loads((artifact("tiny", quant) / "tensor-cache.json").read_text())
    assert weight_bytes("tiny", quant)[0] == cache["metadata"]["ParamBytes"]


def test_size_table_of_the_real_presets():
    table = size_table(["qwen3.5-0.8b"])
    assert (
        "| qwen3.5-0.8b | 0.75B | 3.01 GB (4.000 B/param) + 0.40 GB vision | "
        "1.50 GB (2.000 B/param) + 0.20 GB vision | 0.42 GB (0.563 B/param) + 0.20 GB vision"
        in table
    )
