"""``qwen35-mobile release`` and the release workflow for app teams.

The workflow is checked with actionlint (and the shellcheck it runs on the
``run:`` scripts), both from the test extra; copies with a deliberate error
must fail it.  The release itself is built for the tiny preset (library only)
and resumed: unchanged builds are skipped, a new one alone is built.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwen35_mobile.cli import main
from qwen35_mobile.compile import release as rel

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
VENV_BIN = Path(sys.executable).parent
CI = os.environ.get("CI", "").strip().lower() in ("true", "1")


def _tool(name: str) -> str:
    """The venv's (the test extra's) tool, else one on PATH; a missing one skips,
    or fails under CI=true."""
    exe = shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)
    if exe is None:
        why = f"{name} is not installed (the test extra has it: bash scripts/setup.sh)"
        if CI:
            pytest.fail(why + ", and CI=true requires it", pytrace=False)
        pytest.skip(why)
    return exe


def actionlint(path: Path) -> subprocess.CompletedProcess:
    _tool("shellcheck")  # actionlint runs it on every run: script when it is on PATH
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [_tool("actionlint"), "-no-color", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=path.parent,
        timeout=120,
    )


# ---- the workflow ------------------------------------------------------------


def test_workflow_passes_actionlint():
    result = actionlint(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr
    text = WORKFLOW.read_text()
    assert "target: [host, android, ios, webgpu]" in text
    assert 'python-version: "3.11"' in text
    assert "qwen35-mobile release" in text and "actions/upload-artifact@" in text


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("    runs-on: ubuntu-latest", "    runs_on: ubuntu-latest", 'unexpected key "runs_on"'),
        (
            "TARGET: ${{ matrix.target }}",
            "TARGET: ${{ matrix.targt }}",
            'property "targt" is not defined',
        ),
        ('--targets "$TARGET"', "--targets $TARGET", "SC2086"),  # shellcheck, through actionlint
    ],
    ids=["unknown-key", "expression-typo", "shellcheck"],
)
def test_actionlint_catches_a_broken_copy(tmp_path, old, new, expected):
    """Negative controls: the linter really checks what the clean run says is fine."""
    text = WORKFLOW.read_text()
    assert old in text
    broken = tmp_path / ".github" / "workflows" / "release.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(text.replace(old, new))
    result = actionlint(broken)
    assert result.returncode != 0
    assert expected in result.stdout, result.stdout


# ---- bad input: one line, before any build -------------------------------------


@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            ["--models", "qwen3.5-7b", "--targets", "host", "--quants", "q0f32"],
            "unknown model 'qwen3.5-7b'",
        ),
        (
            ["--models", "tiny", "--targets", "host", "andriod", "--quants", "q0f32"],
            "unknown target 'andriod'",
        ),
        (
            ["--models", "tiny", "--targets", "aarch64", "--quants", "q0f32"],
            "unknown target 'aarch64'",
        ),  # emulation only
        (
            ["--models", "tiny", "--targets", "host", "--quants", "q0f32", "q8"],
            "unknown quantization 'q8'",
        ),
        (
            [
                "--models",
                "tiny",
                "--targets",
                "host",
                "--quants",
                "q0f32",
                "--weights-dir",
                "/no/such/dir",
            ],
            "--weights-dir /no/such/dir: no such directory",
        ),
    ],
)
def test_bad_input_is_one_line_before_any_build(capsys, tmp_path, argv, needle):
    out = tmp_path / "rel"
    assert main(["release", *argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


def test_weights_dir_layout(capsys, tmp_path, checkpoint):
    """DIR/<model>, also in another case (DIR/Tiny); a missing one or a checkpoint
    of other shapes is one line before any build."""
    weights = tmp_path / "weights"
    weights.mkdir()
    out = tmp_path / "rel"
    assert (
        main(
            [
                "release",
                "--models",
                "tiny",
                "--targets",
                "host",
                "--quants",
                "q0f32",
                "--weights-dir",
                str(weights),
                "-o",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint folder tiny/" in err, err
    (weights / "Tiny").symlink_to(checkpoint("tiny"))
    builds, checkpoints = rel.plan(["tiny"], ["host"], ["q0f32"], str(weights))
    assert checkpoints == {"tiny": weights / "Tiny"} and builds == [
        rel.Build("tiny", "host", "q0f32")
    ]
    (weights / "tiny-gva").symlink_to(checkpoint("tiny"))  # tiny's shapes, not tiny-gva's
    assert (
        main(
            [
                "release",
                "--models",
                "tiny-gva",
                "--targets",
                "host",
                "--quants",
                "q0f32",
                "--weights-dir",
                str(weights),
                "-o",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "linear_num_value_heads" in err, err
    assert not out.exists()


def test_checkpoint_fingerprint_reads_headers_not_tensors(tmp_path, checkpoint):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint("tiny"), ckpt)
    first = rel.checkpoint_fingerprint(ckpt)
    entry = first["files"]["model.safetensors"]
    assert set(entry) == {"bytes", "header_sha256"}  # the tensor bytes are not hashed
    assert (
        "sha256" in first["files"]["config.json"] and "sha256" in first["files"]["tokenizer.json"]
    )
    assert rel.checkpoint_fingerprint(ckpt) == first
    config = json.loads((ckpt / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-5
    (ckpt / "config.json").write_text(json.dumps(config))
    assert rel.checkpoint_fingerprint(ckpt)["sha256"] != first["sha256"]


def test_progress_bar_on_a_terminal_plain_lines_in_a_log():
    build = rel.Build("tiny", "host", "q0f32")
    tty = io.StringIO()
    p = rel.Progress(2, tty, tty=True)
    p.start(1, build)
    p.message("[2/4] compiling for target 'host' (llvm)")
    p.finish("built in 3 s")
    p.close()
    text = tty.getvalue()
    assert "\r\x1b[K[>" in text and "] 1/2 tiny host q0f32 (0 s) - [2/4] compiling" in text
    assert "[1/2] tiny host q0f32: built in 3 s\n" in text
    assert "\r\x1b[K[============>" in text  # redrawn at 1 of 2 done
    log = io.StringIO()
    p = rel.Progress(2, log, tty=False)
    p.start(1, build)
    p.message("[2/4] compiling")
    p.finish("skipped")
    assert "\r" not in log.getvalue()
    assert log.getvalue().splitlines() == [
        "      [2/4] compiling",
        "[1/2] tiny host q0f32: skipped",
    ]


def test_ci_true_means_plain_lines(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("CI", "true")
    assert not rel.Progress(1, Terminal()).tty
    monkeypatch.setenv("CI", "false")
    assert rel.Progress(1, Terminal()).tty


# ---- a release, resumed ------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_index(out: Path, expected: list[str]) -> dict:
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] is True and index["failed"] == []
    assert [b["path"] for b in index["builds"]] == expected
    assert set(index["tool"]) >= {"qwen35_mobile", "tvm", "tvm_ffi"}
    for build in index["builds"]:
        folder = out / build["path"]
        manifest = json.loads((folder / "manifest.json").read_text())
        on_disk = sorted(
            p.relative_to(folder).as_posix()
            for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )
        assert sorted(build["files"]) == on_disk
        assert {"manifest.json", "release-inputs.json", manifest["library"]} <= set(on_disk)
        for rel_path, entry in build["files"].items():
            path = folder / rel_path
            assert entry == {"sha256": _sha256(path), "bytes": path.stat().st_size}, rel_path
            if rel_path in manifest["files"]:
                assert entry == manifest["files"][rel_path]
        c = build["contract"]
        assert c["format_version"] == manifest["format_version"] and c["target"] == build["target"]
        assert (
            c["exported_functions"] == manifest["exported_functions"]
            and "decode" in c["exported_functions"]
        )
        assert c["state_kinds"] == ["paged_kv_cache", "rnn_state"]
        assert (
            c["versions"]["tvm"] == index["tool"]["tvm"]
            and c["versions"]["tvm_ffi"] == index["tool"]["tvm_ffi"]
        )
        assert (
            c["target_triple"] == manifest["host_triple"]
            and c["system_lib_prefix"] == manifest["system_lib_prefix"]
        )
        assert build["weights"] is None  # library only
        recorded = json.loads((folder / "release-inputs.json").read_text())
        assert (
            build["inputs_hash"] == recorded["inputs_hash"] == rel.inputs_hash(recorded["inputs"])
        )
    return index


def _mtimes(out: Path) -> dict:
    return {
        p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "index.json"
    }


def test_release_builds_skips_and_resumes(capsys, monkeypatch, tmp_path):
    # Pin the source hash for the length of the test: it must change only with
    # what the test changes (people may edit compile/ meanwhile).
    sources = rel.source_hash()
    monkeypatch.setattr(rel, "source_hash", lambda root=None: sources)
    out = tmp_path / "RELEASE"
    argv = [
        "release",
        "--models",
        "tiny",
        "--targets",
        "host",
        "webgpu",
        "--quants",
        "q0f32",
        "-o",
        str(out),
    ]

    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "2 built, 0 skipped, 0 failed of 2" in captured.out
    assert (
        "[1/2] tiny host q0f32: built in" in captured.err
        and "[2/2] tiny webgpu q0f32: built in" in captured.err
    )
    index = _check_index(out, ["tiny/host/q0f32", "tiny/webgpu/q0f32"])
    assert (
        index["release"]["targets"] == ["host", "webgpu"]
        and index["release"]["weights_dir"] is None
    )
    assert index["builds"][1]["contract"]["library"] == "model.tar"
    first_index, first_mtimes = (out / "index.json").read_bytes(), _mtimes(out)

    # The same command again: nothing is built, nothing changes.
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "0 built, 2 skipped, 0 failed of 2" in captured.out
    assert captured.err.count("skipped, inputs unchanged") == 2
    assert (out / "index.json").read_bytes() == first_index
    assert _mtimes(out) == first_mtimes

    # A quantization added: only the new build runs.
    argv_more = [
        "release",
        "--models",
        "tiny",
        "--targets",
        "host",
        "--quants",
        "q0f32",
        "q0f16",
        "-o",
        str(out),
    ]
    assert main(argv_more) == 0
    captured = capsys.readouterr()
    assert "1 built, 1 skipped, 0 failed of 2" in captured.out
    assert (
        "[1/2] tiny host q0f32: skipped" in captured.err
        and "[2/2] tiny host q0f16: built in" in captured.err
    )
    assert "not part of this release and not in the index: tiny/webgpu/q0f32" in captured.out
    _check_index(out, ["tiny/host/q0f32", "tiny/host/q0f16"])
    assert all(_mtimes(out)[p] == t for p, t in first_mtimes.items())  # the old builds untouched

    # What would make a build run again (checked without building):
    build = rel.Build("tiny", "host", "q0f32")
    folder = out / build.path
    common = dict(checkpoint=None, sources=sources, versions=rel.tool_versions(), fingerprints={})
    options = {"context_window": 4096, "prefill_chunk": 2048}
    same = rel.build_inputs(build, options=options, **common)
    assert rel.why_rebuild(folder, rel.inputs_hash(same), same) is None
    changed = rel.build_inputs(
        build, options={**options, "context_window": 2048}, **common
    )  # a compile option
    assert rel.why_rebuild(folder, rel.inputs_hash(changed), changed) == "inputs changed: options"
    other_src = rel.build_inputs(
        build, options=options, **{**common, "sources": {"compile/": "0", "targets/": "0"}}
    )
    assert (
        rel.why_rebuild(folder, rel.inputs_hash(other_src), other_src) == "inputs changed: sources"
    )
    # An incomplete folder (killed before release-inputs.json, a file cut short) is rebuilt.
    webgpu = out / "tiny/webgpu/q0f32"
    (webgpu / "release-inputs.json").unlink()
    wg = rel.build_inputs(rel.Build("tiny", "webgpu", "q0f32"), options=options, **common)
    assert rel.why_rebuild(webgpu, rel.inputs_hash(wg), wg).startswith("incomplete")
    with open(folder / "model.so", "r+b") as f:
        f.truncate(100)
    assert rel.why_rebuild(folder, rel.inputs_hash(same), same).startswith(
        "incomplete folder (model.so"
    )


def test_source_hash_follows_the_sources(tmp_path):
    for name in rel.SOURCE_DIRS:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    before = rel.source_hash(tmp_path)
    (tmp_path / "compile" / "__pycache__").mkdir(exist_ok=True)
    (tmp_path / "compile" / "__pycache__" / "x.pyc").write_bytes(b"cache")
    assert rel.source_hash(tmp_path) == before  # caches do not count
    with open(tmp_path / "targets" / "__init__.py", "a") as f:
        f.write("\n# a change\n")
    after = rel.source_hash(tmp_path)
    assert after["targets/"] != before["targets/"] and after["compile/"] == before["compile/"]


def _fake_compile(fail: dict):
    """compile_model's stand-in: a minimal artifact, or the error ``fail`` names for a quantization."""

    def compile_model(model, target, quant, out, **kwargs):
        if quant in fail:
            raise fail[quant]
        out.mkdir(parents=True, exist_ok=kwargs.get("force", False))
        (out / "model.so").write_bytes(b"library")
        manifest = {
            "format_version": 1,
            "target": target,
            "library": "model.so",
            "host_triple": "x86_64-linux-gnu",
            "exported_functions": ["decode"],
            "state_kinds": ["paged_kv_cache", "rnn_state"],
            "files": {"model.so": {"sha256": _sha256(out / "model.so"), "bytes": 7}},
        }
        (out / "manifest.json").write_text(json.dumps(manifest))
        return manifest

    return compile_model


def test_a_failed_build_does_not_stop_the_others(capsys, monkeypatch, tmp_path):
    from qwen35_mobile.compile import compiler

    monkeypatch.setattr(compiler, "compile_model", _fake_compile({"q0f16": RuntimeError("boom")}))
    out = tmp_path / "rel"
    argv = [
        "release",
        "--models",
        "tiny",
        "--targets",
        "host",
        "--quants",
        "q0f16",
        "q0f32",
        "-o",
        str(out),
    ]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 1
    captured = capsys.readouterr()
    assert (
        "[1/2] tiny host q0f16: FAILED: boom" in captured.err
        and "[2/2] tiny host q0f32: built in" in captured.err
    )
    assert "1 built, 0 skipped, 1 failed of 2" in captured.out
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] is False and index["failed"] == [
        {"path": "tiny/host/q0f16", "error": "boom"}
    ]
    assert [b["path"] for b in index["builds"]] == ["tiny/host/q0f32"]


def test_an_interrupt_inside_tvm_stops_the_release(capsys, monkeypatch, tmp_path):
    """Ctrl-C that TVM hands back as its own error stops everything (exit 130);
    the builds done so far stay in the index, and the next run goes on."""
    from qwen35_mobile.compile import compiler

    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as k:
        wrapped = RuntimeError("")
        wrapped.__cause__ = k
    monkeypatch.setattr(compiler, "compile_model", _fake_compile({"q0f16": wrapped}))
    out = tmp_path / "rel"
    argv = [
        "release",
        "--models",
        "tiny",
        "--targets",
        "host",
        "--quants",
        "q0f32",
        "q0f16",
        "q4f16_1",
        "-o",
        str(out),
    ]
    assert main(argv) == 130
    captured = capsys.readouterr()
    assert "q4f16_1" not in captured.err and "FAILED" not in captured.err
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] is False and [b["path"] for b in index["builds"]] == [
        "tiny/host/q0f32"
    ]
    monkeypatch.setattr(compiler, "compile_model", _fake_compile({}))
    assert main(argv) == 0
    assert "1 skipped" in capsys.readouterr().out
