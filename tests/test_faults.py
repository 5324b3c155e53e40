"""Atomic output under faults: a compile killed (SIGKILL) or terminated
(SIGTERM) at any moment, two compiles into one OUT, a full disk.

Real ``qwen35-mobile compile`` processes of the tiny checkpoint (host, q0f32);
nothing is mocked.  After every fault OUT is absent or complete (every file of
its manifest present with its sha256; ``qwen35-mobile verify`` too, where that
command exists), and what a dead compile left beside OUT is removed by the next.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = Path(sys.executable).with_name("qwen35-mobile")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
WAIT = 600  # seconds: the longest any compile here may take on a loaded machine


def cli(*args) -> list[str]:
    head = [str(CLI)] if CLI.exists() else [sys.executable, "-m", "qwen35_mobile.cli"]
    return head + [str(a) for a in args]


def compile_cmd(ckpt: Path, out: Path, *extra) -> list[str]:
    return cli(
        "compile", "--model", ckpt, "--target", "host", "--quant", "q0f32", "-o", out, *extra
    )


def start(cmd: list[str], **options) -> subprocess.Popen:
    # Its own session, so that the test can end what a killed compile leaves
    # running (a linker TVM started) by the process group it started.
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,
        **options,
    )


def finish(proc: subprocess.Popen, timeout: float = WAIT) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    end_group(proc)
    return proc.returncode, out, err


def end_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def siblings(out: Path) -> list[str]:
    """What atomic_directory makes beside OUT: .OUT.partial-*, .OUT.old-*, .OUT.lock."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def partials(out: Path) -> list[str]:
    return [
        n for n in siblings(out) if n.startswith((f".{out.name}.partial-", f".{out.name}.old-"))
    ]


def wait_for(condition, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            return condition()
        time.sleep(0.05)
    return False


_verify: list[bool] = []


def has_verify() -> bool:
    if not _verify:
        _verify.append(
            subprocess.run(cli("verify", "--help"), capture_output=True, env=ENV).returncode == 0
        )
    return _verify[0]


def state(out: Path) -> str:
    """'absent' or 'complete'; fails on anything else (a half-written OUT)."""
    if not os.path.lexists(out):
        return "absent"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"], manifest
    for rel, record in manifest["files"].items():
        data = (out / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == record["sha256"], (
            f"{out / rel} differs from the manifest"
        )
    if has_verify():
        result = subprocess.run(cli("verify", out), capture_output=True, text=True, env=ENV)
        assert result.returncode == 0, result.stdout + result.stderr
    return "complete"


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(checkpoint) -> Path:
    return checkpoint("tiny")


@pytest.fixture(scope="module")
def race(ckpt, tmp_path_factory) -> dict:
    """Two compiles into one OUT: the second starts once the first holds the
    lock (its partial directory exists).  Also measures a full compile."""
    out = tmp_path_factory.mktemp("race") / "out"
    t0 = time.monotonic()
    first = start(compile_cmd(ckpt, out))
    assert wait_for(lambda: partials(out), WAIT, first), first.communicate()
    t1 = time.monotonic()
    second = start(compile_cmd(ckpt, out))
    code2, _, err2 = finish(second)
    second_seconds = time.monotonic() - t1
    first_running = first.poll() is None
    code1, stdout1, err1 = finish(first)
    return {
        "out": out,
        "seconds": time.monotonic() - t0,
        "first": (first.pid, code1, stdout1, err1),
        "second": (code2, err2, second_seconds, first_running),
    }


def test_second_compile_into_the_same_out_fails_at_once(race):
    out = race["out"]
    pid, code1, _, err1 = race["first"]
    code2, err2, seconds2, first_running = race["second"]
    assert first_running, "the first compile ended before the second gave up"
    assert code2 == 2
    line = one_line(err2)
    assert line.startswith("qwen35-mobile: error: ") and str(out) in line
    assert "being written by another" in line and f"pid {pid}" in line, line
    assert code1 == 0, err1
    assert state(out) == "complete"
    assert siblings(out) == []  # no partial directory, and the lock file is gone
    print(f"full compile {race['seconds']:.1f} s; the second gave up after {seconds2:.1f} s")


def test_sigkill_at_random_moments_then_a_rerun_cleans_up(race, ckpt, tmp_path):
    out = tmp_path / "out"
    rng = random.Random(20240609)
    delays = [rng.uniform(0.5, race["seconds"]) for _ in range(3)]
    seen = []
    for delay in delays:
        proc = start(compile_cmd(ckpt, out, "--force"))
        try:
            proc.wait(delay)
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.wait()
        end_group(proc)
        seen.append((round(delay, 1), proc.returncode, state(out), len(partials(out))))
    if not partials(out):  # make sure the rerun has something to clean: kill one mid-write
        proc = start(compile_cmd(ckpt, out, "--force"))
        assert wait_for(lambda: partials(out), WAIT, proc)
        time.sleep(0.5)
        proc.kill()
        proc.wait()
        end_group(proc)
        seen.append(("partial", proc.returncode, state(out), len(partials(out))))
    print("kills (delay s, exit, OUT, stale dirs):", seen)
    stale = partials(out)
    assert stale, seen

    t0 = time.monotonic()
    code, _, err = finish(start(compile_cmd(ckpt, out, "--force")))
    assert code == 0, err
    assert state(out) == "complete"
    assert siblings(out) == [], f"left beside OUT: {siblings(out)} (stale before: {stale})"
    print(f"rerun {time.monotonic() - t0:.1f} s removed {stale}")


def test_sigterm_is_like_ctrl_c(race, ckpt, tmp_path):
    out = tmp_path / "out"
    proc = start(compile_cmd(ckpt, out))
    assert wait_for(lambda: partials(out), WAIT, proc)
    time.sleep(random.Random(15).uniform(0.5, race["seconds"] / 3))
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    assert code == 128 + signal.SIGTERM, err
    assert one_line(err) == "qwen35-mobile: terminated (SIGTERM)"
    assert state(out) == "absent"
    assert siblings(out) == []
    print(f"exited {time.monotonic() - t0:.1f} s after SIGTERM")


def _file_size_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG

    return apply


def test_a_file_size_limit_too_small_for_a_library_is_refused_at_once(ckpt, tmp_path):
    """EFBIG would come from TVM's LLVM, which ends the process on a failed
    object-file write, past any clean-up: refused before the build."""
    out = tmp_path / "out"
    t0 = time.monotonic()
    code, stdout, err = finish(start(compile_cmd(ckpt, out), preexec_fn=_file_size_limit(1 << 20)))
    assert code == 2, err
    line = one_line(err)
    assert (
        line.startswith("qwen35-mobile: error: ") and str(out) in line and "no space left" in line
    ), line
    assert "ulimit -f" in line and "[2/4]" not in stdout, stdout
    assert state(out) == "absent" and siblings(out) == []
    print(f"1 MB file-size limit: refused after {time.monotonic() - t0:.1f} s: {line}")


def _mount_tmpfs(mnt: Path, size: str) -> str | None:
    """Mount a tmpfs (as root, where the sandbox allows); None, or why not."""
    mnt.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
            capture_output=True,
            text=True,
        )
    except OSError as e:
        return str(e)
    return (
        None
        if result.returncode == 0
        else (result.stderr.strip() or f"mount exited {result.returncode}")
    )


def _fill(path: Path, leave: int = 0) -> None:
    """Write zeros into ``path`` until the disk is full (or ``leave`` bytes remain)."""
    block = b"\0" * (1 << 20)
    with open(path, "wb") as f:
        while True:
            stat = os.statvfs(path.parent)
            if stat.f_bavail * stat.f_frsize <= leave + len(block):
                break
            try:
                f.write(block)
                f.flush()
            except OSError:
                break


def test_disk_full(ckpt, tmp_path):
    """A real full disk (ENOSPC) on a 128 MB tmpfs (the tiny artifact takes
    75 MB): too little room from the start is refused before the build; a disk
    that fills up while the weights are written fails there.  Where no tmpfs
    can be mounted, a 32 MB file-size limit fails the 63 MB first weight shard
    (EFBIG) instead.  Always: exit 2, one line naming OUT, nothing left."""
    disk = tmp_path / "disk"
    why_not = _mount_tmpfs(disk, "128m")
    if why_not is not None:
        out = tmp_path / "out"
        t0 = time.monotonic()
        code, stdout, err = finish(
            start(compile_cmd(ckpt, out), preexec_fn=_file_size_limit(32 << 20))
        )
        assert code == 2, err
        line = one_line(err)
        assert str(out) in line and "no space left (a file exceeded the file-size limit" in line, (
            line
        )
        assert "[3/4] converting weights" in stdout, stdout
        assert state(out) == "absent" and siblings(out) == []
        print(f"no tmpfs ({why_not}); 32 MB file-size limit: {time.monotonic() - t0:.1f} s: {line}")
        return
    try:
        out, filler = disk / "out", disk / "filler"
        _fill(filler, leave=40 << 20)
        t0 = time.monotonic()
        code, stdout, err = finish(start(compile_cmd(ckpt, out)))
        assert code == 2, err
        line = one_line(err)
        assert str(out) in line and "no space left" in line and "[2/4]" not in stdout, line
        assert state(out) == "absent" and siblings(out) == []
        print(f"too small from the start: {time.monotonic() - t0:.1f} s: {line}")

        filler.unlink()
        t0 = time.monotonic()
        proc = start(compile_cmd(ckpt, out))
        for text in proc.stdout:
            if text.startswith("[3/4] converting weights"):
                _fill(filler)
                break
        code, stdout, err = finish(proc)
        assert code == 2, err
        line = one_line(err)
        assert str(out) in line and "no space left (the device is full" in line, line
        assert state(out) == "absent" and siblings(out) == []
        print(f"filled while writing the weights: {time.monotonic() - t0:.1f} s: {line}")
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)
