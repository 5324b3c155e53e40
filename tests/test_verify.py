"""``qwen35-mobile verify`` and the cheap check of ``Model.load``: one altered
file, one line naming it.  Each tampering is a negative control: a clean copy
of the same artifact passes, so a check that does not look fails its test."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwen35_mobile.bindings.artifact import BUILD_INFO, verify
from qwen35_mobile.cli import main
from qwen35_mobile.errors import UserError


@pytest.fixture(scope="module")
def built(artifact) -> Path:
    """The tiny host artifact, built once (the session's)."""
    return artifact("tiny")


@pytest.fixture
def copy(built, tmp_path) -> Path:
    """A copy of the artifact to tamper with: hard links (the files are not
    written in place: :func:`rewrite` replaces a file), or copies across devices."""
    dst = tmp_path / "art"

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(built, dst, copy_function=link)
    return dst


def rewrite(path: Path, edit) -> None:
    """Replace ``path`` by ``edit(its bytes)`` (a new file: a hard link's
    other name keeps the original)."""
    data = edit(path.read_bytes())
    path.unlink()
    path.write_bytes(data)


def flip(offset_fraction: float = 0.5):
    def edit(data: bytes) -> bytes:
        i = int(len(data) * offset_fraction)
        return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]

    return edit


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.unlink()
    path.write_text(json.dumps(data, indent=2))


def verify_cli(capsys, art: Path) -> tuple[int, list[str], str]:
    try:
        code = main(["verify", str(art)])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def run_cli(capsys, art: Path) -> tuple[int, str]:
    code = main(["run", str(art), "--prompt", "hi", "--max-new-tokens", "1"])
    return code, capsys.readouterr().err.strip()


def _swap_a_shape(cache: dict) -> str:
    """Swap the two dimensions of the first 2-D non-square tensor (its bytes
    still fit: only the comparison with the manifest can tell)."""
    for shard in cache["records"]:
        for rec in shard["records"]:
            if len(rec["shape"]) == 2 and rec["shape"][0] != rec["shape"][1]:
                rec["shape"] = rec["shape"][::-1]
                return rec["name"]
    raise AssertionError("no 2-D non-square tensor in the tiny model")


# name: (tamper(artifact) -> None, file named, words in the verify line, words in Model.load's error)
CASES = {
    "params_shard": (
        lambda a: rewrite(a / "params_shard_0.bin", flip()),
        "params_shard_0.bin",
        "sha256 does not match",
        "md5 mismatch",
    ),
    "tokenizer": (
        lambda a: rewrite(a / "tokenizer.json", flip(0.3)),
        "tokenizer.json",
        "sha256 does not match",
        "sha256 does not match",
    ),
    "library": (
        lambda a: rewrite(a / "model.so", flip(0.4)),
        "model.so",
        "sha256 does not match",
        "sha256 does not match",
    ),
    "chat_config_json": (
        lambda a: rewrite(a / "mlc-chat-config.json", lambda d: d[: len(d) // 2]),
        "mlc-chat-config.json",
        "not valid JSON",
        "not valid JSON",
    ),
    "manifest_key_parameters": (
        lambda a: edit_json(a / "manifest.json", lambda m: m.pop("parameters")),
        "manifest.json",
        "lacks the key 'parameters'",
        "lacks the key 'parameters'",
    ),
    "manifest_key_library": (
        lambda a: edit_json(a / "manifest.json", lambda m: m.pop("library")),
        "manifest.json",
        "lacks the key 'library'",
        "lacks the key 'library'",
    ),
    "manifest_key_versions": (
        lambda a: edit_json(a / "manifest.json", lambda m: m.pop("versions")),
        "manifest.json",
        "lacks the key 'versions'",
        "lacks the key 'versions'",
    ),
    "tensor_cache_shape": (
        lambda a: edit_json(a / "tensor-cache.json", _swap_a_shape),
        "tensor-cache.json",
        "has shape",
        "has shape",
    ),
    "unlisted_file": (
        lambda a: (a / "extra.bin").write_bytes(b"x"),
        "extra.bin",
        "not listed in the manifest",
        None,
    ),
}


def test_clean_artifact_passes(capsys, copy):
    (copy / "parity.json").write_text("{}")  # written after the build: not a problem
    (copy / "parity-opencl.png").write_bytes(b"png")
    assert (copy / BUILD_INFO).exists()
    code, out, err = verify_cli(capsys, copy)
    assert code == 0 and len(out) == 1 and out[0].startswith(f"OK {copy}"), (out, err)
    assert verify(copy).ok


@pytest.mark.parametrize("case", list(CASES))
def test_tampering_fails_verify_and_load(capsys, copy, case):
    from qwen35_mobile import Model

    tamper, name, verify_words, load_words = CASES[case]
    assert verify(copy).ok  # the control: this copy passes before it is tampered with
    tamper(copy)

    code, out, err = verify_cli(capsys, copy)
    assert code == 1, (out, err)
    assert len(out) == 1, out  # one altered file, one line
    assert out[0].startswith(str(copy / name) + ":") and verify_words in out[0], out

    if load_words is None:  # an extra file does not stop the model from loading
        return
    with pytest.raises(UserError) as raised:
        Model.load(copy)
    message = str(raised.value)
    assert name in message and load_words in message and "\n" not in message, message
    code, err = run_cli(capsys, copy)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert name in err


def test_missing_file(capsys, copy):
    (copy / "tokenizer_config.json").unlink()
    code, out, _ = verify_cli(capsys, copy)
    assert code == 1 and out == [
        f"{copy / 'tokenizer_config.json'}: missing (the manifest lists it)"
    ]


def test_corrupt_manifest(capsys, copy):
    rewrite(copy / "manifest.json", lambda d: d[:-10])
    code, out, _ = verify_cli(capsys, copy)
    assert code == 1 and len(out) == 1 and "manifest.json: corrupt manifest" in out[0], out


def test_other_format_version(capsys, copy):
    edit_json(copy / "manifest.json", lambda m: m.update(format_version=1))
    code, out, _ = verify_cli(capsys, copy)
    assert code == 1 and len(out) == 1 and "artifact format 1 is not" in out[0], out
    from qwen35_mobile import Model

    with pytest.raises(UserError, match="artifact format 1 is not"):
        Model.load(copy)


def test_verify_in_a_process(copy):
    """The installed command: one line per problem on stdout, exit 1, no traceback."""
    rewrite(copy / "mlc-chat-config.json", lambda d: b"{" + d)
    cli = [sys.executable, "-m", "qwen35_mobile.cli"]
    done = subprocess.run([*cli, "verify", str(copy)], capture_output=True, text=True, timeout=300)
    lines = done.stdout.splitlines()
    assert done.returncode == 1 and len(lines) == 1, done
    assert lines[0].startswith(str(copy / "mlc-chat-config.json") + ": not valid JSON"), lines
    assert "Traceback" not in done.stderr, done.stderr
    done = subprocess.run(
        [*cli, "run", str(copy), "--prompt", "hi", "--max-new-tokens", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "mlc-chat-config.json" in done.stderr and "Traceback" not in done.stderr
