"""The android (aarch64) model library links with the Debian cross toolchain
(binutils-aarch64-linux-gnu, installed by scripts/setup_static_checks.sh),
leaving nothing undefined but what the TVM runtime and libc/libm provide
(parity/static_checks.py: check_aarch64_link).  Without the cross binutils
the tests skip, or fail under CI=true (tests/conftest.py: need)."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import need

from qwen35_mobile.errors import UserError
from qwen35_mobile.parity.static_checks import CheckUnavailable, check_aarch64_link


@pytest.fixture(scope="module")
def cross_binutils():
    missing = [t for t in ("ld", "as", "nm") if shutil.which(f"aarch64-linux-gnu-{t}") is None]
    need(
        missing
        and f"no aarch64-linux-gnu-{'/'.join(missing)} (Debian: apt-get install binutils-aarch64-linux-gnu)",
        "the aarch64 cross binutils",
    )


needs_cross_binutils = pytest.mark.usefixtures("cross_binutils")


@pytest.fixture(scope="module")
def android_tar(tmp_path_factory) -> Path:
    """model.tar of the tiny model's android q0f32 library (no weights)."""
    from qwen35_mobile.compile.compiler import compile_model

    out = tmp_path_factory.mktemp("aarch64") / "tiny-android-q0f32"
    compile_model("tiny", "android", "q0f32", out, progress=lambda _: None)
    return out / "model.tar"


def _with_object(model_tar: Path, obj: Path, out: Path) -> Path:
    """A copy of model_tar with obj added."""
    with tarfile.open(model_tar) as src, tarfile.open(out, "w") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
        dst.add(obj, arcname=obj.name)
    return out


@needs_cross_binutils
def test_tiny_android_links_needing_only_the_tvm_runtime(android_tar):
    undefined = check_aarch64_link(android_tar)
    assert "TVMFFIEnvModRegisterSystemLibSymbol" in undefined  # the system-lib registration
    assert all(s.startswith("TVMFFI") for s in undefined), undefined


@needs_cross_binutils
def test_unknown_undefined_symbol_fails_naming_it(android_tar, tmp_path):
    source = tmp_path / "bad.s"
    source.write_text(
        "  .text\n  .globl qwen35_bad_caller\nqwen35_bad_caller:\n"
        "  bl qwen35_no_such_runtime_symbol\n  bl expf\n  ret\n"
    )
    obj = tmp_path / "bad.o"
    subprocess.run(["aarch64-linux-gnu-as", "-o", str(obj), str(source)], check=True)
    bad_tar = _with_object(android_tar, obj, tmp_path / "model.tar")
    with pytest.raises(UserError, match="qwen35_no_such_runtime_symbol") as err:
        check_aarch64_link(bad_tar)
    assert "expf" not in str(err.value)  # libm is allowed


@needs_cross_binutils
def test_non_aarch64_object_fails_the_link(android_tar, tmp_path):
    obj = tmp_path / "x86.o"
    obj.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 9 + b"\x01\0\x3e\0" + b"\0" * 44)
    bad_tar = _with_object(android_tar, obj, tmp_path / "model.tar")
    with pytest.raises(UserError, match="do not link"):
        check_aarch64_link(bad_tar)


def test_missing_toolchain_is_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(CheckUnavailable, match="binutils-aarch64-linux-gnu"):
        check_aarch64_link(tmp_path / "model.tar")
