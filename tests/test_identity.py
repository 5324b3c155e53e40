"""Byte-identical rebuilds: the same inputs give the same artifact files,
wherever the checkpoint and the output are.  Only ``build-info.json`` (time,
host, paths, durations; listed by no manifest) differs."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from qwen35_mobile.bindings.artifact import BUILD_INFO, verify
from qwen35_mobile.cli import main


def digests(artifact: Path) -> dict[str, str]:
    """sha256 of every file of the artifact but build-info.json."""
    return {
        p.relative_to(artifact).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(artifact.rglob("*"))
        if p.is_file() and p.name != BUILD_INFO
    }


def strings(obj) -> set[str]:
    """Every string (key or value) inside a JSON object."""
    if isinstance(obj, str):
        return {obj}
    if isinstance(obj, dict):
        return set(obj) | {s for v in obj.values() for s in strings(v)}
    if isinstance(obj, list):
        return {s for v in obj for s in strings(v)}
    return set()


@pytest.fixture(scope="module")
def twin_checkpoints(checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny checkpoint, and a copy of it elsewhere under the same name
    (the name is an input: it names the model and a static library's prefix)."""
    first = checkpoint("tiny")
    second = tmp_path_factory.mktemp("elsewhere") / "deeper" / first.name
    shutil.copytree(first, second)
    return first, second


@pytest.fixture(scope="module")
def builds(twin_checkpoints, artifact, tmp_path_factory):
    """builds(target) -> two artifacts of the tiny model in q0f32: from the
    checkpoint and from its copy elsewhere, into differently named OUTs, in
    two processes."""
    from qwen35_mobile.compile.compiler import compile_model

    first, second = twin_checkpoints
    root = tmp_path_factory.mktemp("identity")
    made = {}

    def make(target: str) -> tuple[Path, Path]:
        if target not in made:
            if target == "host":
                one = artifact("tiny")  # the session's build of `first`
            else:
                one = root / target / "one" / "out"
                compile_model(str(first), target, "q0f32", one, progress=lambda _: None)
            two = root / target / "two" / "another-name"
            # In another process: TVM's hash-map orders differ between processes, not within one.
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "qwen35_mobile.cli",
                    "compile",
                    "--model",
                    str(second),
                    "--target",
                    target,
                    "--quant",
                    "q0f32",
                    "-o",
                    str(two),
                ],
                check=True,
                capture_output=True,
                timeout=1200,
            )
            made[target] = one, two
        return made[target]

    return make


@pytest.mark.parametrize("target", ["host", "android"])
def test_two_builds_are_byte_identical(target, builds, twin_checkpoints):
    first, second = twin_checkpoints
    one, two = builds(target)

    a, b = digests(one), digests(two)
    assert set(a) == set(b), set(a) ^ set(b)
    assert [name for name in a if a[name] != b[name]] == []
    assert {
        "manifest.json",
        "tensor-cache.json",
        json.loads((one / "manifest.json").read_text())["library"],
    } <= set(a)

    # The build facts are there, and they are what differs.
    infos = [json.loads((d / BUILD_INFO).read_text()) for d in (one, two)]
    for info, ckpt in zip(infos, (first, second)):
        assert info["compile_seconds"] > 0 and info["library_compile_seconds"] > 0
        assert (
            info["checkpoint_path"] == str(ckpt.resolve())
            and info["build_host"] == socket.gethostname()
        )
    manifest = json.loads((two / "manifest.json").read_text())
    assert BUILD_INFO not in manifest["files"] and "compile_seconds" not in manifest
    assert manifest["model"] == first.name and manifest["checkpoint"]["name"] == first.name
    assert (
        manifest["checkpoint"]["config_sha256"]
        == hashlib.sha256((first / "config.json").read_bytes()).hexdigest()
    )
    text = (two / "manifest.json").read_text()
    for fact in (str(two.parent), str(first.parent), str(second.parent)):
        assert fact not in text, fact
    assert socket.gethostname() not in strings(manifest), "the host name"


def test_a_device_build_verifies_here(builds, capsys):
    """An android artifact cannot run on this machine, yet verifies: an info line, not a problem."""
    out = builds("android")[1]
    result = verify(out, check_runnable=True)
    assert result.ok and "built for target 'android'" in result.runs_here, result
    assert main(["verify", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"OK {out}") and lines[1].startswith("info: "), (
        lines
    )


def test_static_library_tar_is_deterministic(tmp_path):
    from qwen35_mobile.compile.reproducible import deterministic_tar

    objects = tmp_path / "objects"
    objects.mkdir()
    for name, data in (("lib0.o", b"\x7fELF host"), ("devc.o", b"\x7fELF device")):
        (objects / name).write_bytes(data)
    deterministic_tar(str(tmp_path / "a.tar"), [str(objects / "lib0.o"), str(objects / "devc.o")])
    os.utime(objects / "lib0.o", (1_000_000, 1_000_000))
    os.chmod(objects / "devc.o", 0o600)
    deterministic_tar(str(tmp_path / "b.tar"), [str(objects / "devc.o"), str(objects / "lib0.o")])
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:  # gzip'd, as TVM's own tar (tar -czf) makes it
        members = tar.getmembers()
        assert [m.name for m in members] == ["devc.o", "lib0.o"]
        assert all(
            m.mtime == 0 and m.uid == m.gid == 0 and m.uname == m.gname == "" for m in members
        )
        assert tar.extractfile("lib0.o").read() == b"\x7fELF host"


def test_shape_funcs_sorted_only_where_independent():
    """VMShapeLower's stores come in hash-map order; sorting them must keep a
    store after the stores whose slots it reads."""
    from tvm import tirx

    from qwen35_mobile.compile.reproducible import _sorted_seq

    heap = tirx.decl_buffer((12,), "int64", name="H")

    def store(slot, value):
        return tirx.BufferStore(heap, value, [tirx.IntImm("int64", slot)])

    def load(slot):
        return tirx.BufferLoad(heap, [tirx.IntImm("int64", slot)])

    seq = [
        store(5, load(0) * 8),
        store(2, load(0) * 3),
        store(7, load(5) + 1),
        store(6, load(0)),
        store(1, tirx.floordiv(load(0) + 63, 64)),
        store(3, load(7) * 2),
        store(4, load(0)),
    ]
    order = [int(s.indices[0].value) for s in _sorted_seq(seq)]
    assert order == [
        2,
        5,
        1,
        6,
        7,
        3,
        4,
    ]  # runs: {5, 2} | {7, 6, 1} (7 reads 5) | {3, 4} (3 reads 7)


def test_android_build_is_the_same_with_the_opencl_runtime_loaded(
    builds, twin_checkpoints, tmp_path
):
    """A process that has loaded the project's OpenCL add-on (the parity rig
    does) builds the same android library: the add-on's module writes its
    functions in the order the compiler gave them, as TVM's own source module
    does (it once wrote them in hash-map order, and the suite's in-process
    build differed)."""
    from conftest import need

    from qwen35_mobile.bindings.opencl_runtime import why_unavailable

    need(why_unavailable(), "the OpenCL runtime add-on (scripts/setup_emulators.sh opencl)")
    first, _ = twin_checkpoints
    reference, _ = builds("android")
    out = tmp_path / "with-addon"
    probe = (
        "from qwen35_mobile.bindings.opencl_runtime import load_opencl_runtime\n"
        "load_opencl_runtime()\n"
        "from qwen35_mobile.compile.compiler import compile_model\n"
        f"compile_model({str(first)!r}, 'android', 'q0f32', {str(out)!r}, progress=lambda _: None)\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, timeout=1200)
    a, b = digests(reference), digests(out)
    assert [name for name in a if a[name] != b.get(name)] == []
