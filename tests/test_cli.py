"""Bad input: one clear error line, a non-zero exit, and no partial output."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qwen35_mobile.cli import main
from qwen35_mobile.errors import UserError

LAYER0 = "model.language_model.layers.0.mlp.up_proj.weight"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_clean_failure(code, err, out_dir, *needles):
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("qwen35-mobile: error: ")
    for needle in needles:
        assert needle in err, err
    assert not out_dir.exists()
    assert not list(out_dir.parent.glob(f".{out_dir.name}.partial-*"))


@pytest.fixture
def broken(checkpoint, tmp_path):
    """A writable copy of the tiny checkpoint."""
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoint("tiny"), dst)
    return dst


def _edit_tensors(ckpt, edit):
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor(capsys, broken, tmp_path):
    _edit_tensors(broken, lambda t: t.pop(LAYER0))
    out = tmp_path / "out"
    assert_clean_failure(*run_cli(capsys, "compile", "--model", broken, "-o", out), out, LAYER0)


def test_wrong_shape(capsys, broken, tmp_path):
    _edit_tensors(broken, lambda t: t.update({LAYER0: np.zeros((3, 3), np.float32)}))
    out = tmp_path / "out"
    assert_clean_failure(
        *run_cli(capsys, "compile", "--model", broken, "-o", out), out, LAYER0, "shape"
    )


def test_corrupt_safetensors(capsys, broken, tmp_path):
    path = broken / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out = tmp_path / "out"
    assert_clean_failure(
        *run_cli(capsys, "compile", "--model", broken, "-o", out), out, "model.safetensors"
    )


def test_inconsistent_config(capsys, broken, tmp_path):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["text_config"]["num_key_value_heads"] = 3
    (broken / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert_clean_failure(
        *run_cli(capsys, "compile", "--model", broken, "-o", out), out, "num_key_value_heads"
    )


def test_unknown_preset_target_quant_and_missing_path(capsys, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(
        *run_cli(capsys, "compile", "--model", "qwen3.5-1b", "-o", out), out, "qwen3.5-1b"
    )
    assert_clean_failure(
        *run_cli(capsys, "compile", "--model", "tiny", "--target", "psp", "-o", out), out, "'psp'"
    )
    assert_clean_failure(
        *run_cli(capsys, "compile", "--model", "tiny", "--quant", "q3f7", "-o", out), out, "q3f7"
    )
    assert_clean_failure(
        *run_cli(capsys, "compile", "--model", "tiny", "--weights", tmp_path / "nope", "-o", out),
        out,
        "nope",
    )
    assert_clean_failure(*run_cli(capsys, "run", tmp_path / "nope", "--prompt", "hi"), out, "nope")


def test_weights_that_do_not_fit_the_preset(capsys, checkpoint, tmp_path):
    out = tmp_path / "out"
    code, err = run_cli(
        capsys, "compile", "--model", "qwen3.5-0.8b", "--weights", checkpoint("tiny"), "-o", out
    )
    assert_clean_failure(code, err, out, "hidden_size")


def test_existing_output_is_not_overwritten(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    code, err = run_cli(capsys, "compile", "--model", "tiny", "-o", out)
    assert code == 2 and "already exists" in err
    assert (out / "keep").read_text() == "x"


def test_prompt_longer_than_the_context_and_bad_token_ids(capsys, artifact, checkpoint, tmp_path):
    from qwen35_mobile import Model

    small = tmp_path / "small"
    assert (
        main(
            [
                "compile",
                "--model",
                str(checkpoint("tiny")),
                "-o",
                str(small),
                "--context-window",
                "16",
            ]
        )
        == 0
    )
    code, err = run_cli(capsys, "run", small, "--prompt", "word " * 40, "--max-new-tokens", "4")
    assert code == 2 and "context window of 16 tokens" in err and len(err.splitlines()) == 1

    m = Model.load(artifact("tiny"))
    with pytest.raises(UserError, match="outside the vocabulary"):
        m.logits([1, 2, m.engine.vocab_size])
    with pytest.raises(UserError, match="outside the vocabulary"):
        m.logits([-1])


def test_altered_library_is_refused(capsys, artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(artifact("tiny"), art)
    lib = art / "model.so"
    lib.write_bytes(lib.read_bytes() + b"\0")
    code, err = run_cli(capsys, "run", art, "--prompt", "hi")
    assert code == 2 and "sha256" in err
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["versions"]["tvm"] = "0.1.0"
    (art / "manifest.json").write_text(json.dumps(manifest))
    code, err = run_cli(capsys, "run", art, "--prompt", "hi")
    assert code == 2 and "tvm 0.1.0" in err


def test_make_checkpoint_command(capsys, tmp_path):
    out = tmp_path / "ck"
    assert main(["make-checkpoint", "--preset", "tiny-gva", "--max-shard-mb", "20", str(out)]) == 0
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
    assert "tiny-gva" in capsys.readouterr().out
    bad = tmp_path / "bad"
    assert_clean_failure(
        *run_cli(capsys, "make-checkpoint", "--preset", "qwen9", bad), bad, "qwen9"
    )


def test_help_explains(capsys):
    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    text = capsys.readouterr().out
    for word in (
        "--model",
        "--target",
        "--quant",
        "--weights",
        "atomically",
        "qwen3.5-0.8b",
        "q0f16",
        "host",
    ):
        assert word in text
