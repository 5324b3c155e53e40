"""The set-up scripts' apt helpers (scripts/lib/apt.sh) on sources files of
our own (APT_ETC): the mirror comes from deb822 ``URIs:`` (comment lines never
count), our backports entry is written once, repaired when it differs, and
the broken entry an earlier version wrote is removed."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def _apt_sh(etc: Path, script: str) -> str:
    out = subprocess.run(
        ["bash", "-c", f"set -euo pipefail; . scripts/lib/apt.sh; {script}"],
        cwd=ROOT,
        env={"APT_ETC": str(etc), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _etc(tmp_path: Path, sources: dict[str, str]) -> Path:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    for name, text in sources.items():
        (etc / name).write_text(text)
    return etc


def test_mirror_from_deb822_uris_not_comments(tmp_path):
    etc = _etc(tmp_path, {"sources.list.d/debian.sources": DEB822})
    assert _apt_sh(etc, "debian_mirror") == "http://mirror.example/debian"


def test_mirror_from_one_line_sources_and_default(tmp_path):
    etc = _etc(
        tmp_path,
        {
            "sources.list": "# deb http://commented.example/debian bookworm main\n"
            "deb http://plain.example/debian/ bookworm main\n"
        },
    )
    assert _apt_sh(etc, "debian_mirror") == "http://plain.example/debian"
    empty = _etc(tmp_path / "empty", {})
    assert _apt_sh(empty, "debian_mirror") == "http://deb.debian.org/debian"


def test_backports_written_once_and_repaired(tmp_path):
    etc = _etc(
        tmp_path,
        {
            "sources.list.d/debian.sources": DEB822,
            # what the earlier script wrote from the commented snapshot line
            "sources.list.d/bookworm-backports.list": "deb http://snapshot.debian.org/archive/debian bookworm-backports main\n",
        },
    )
    _apt_sh(etc, "ensure_backports bookworm")
    ours = etc / "sources.list.d/qwen35-mobile-backports.list"
    assert not (etc / "sources.list.d/bookworm-backports.list").exists()
    lines = [ln for ln in ours.read_text().splitlines() if not ln.startswith("#")]
    assert lines == ["deb http://mirror.example/debian bookworm-backports main"]
    before = ours.stat().st_mtime_ns
    _apt_sh(etc, "ensure_backports bookworm")  # idempotent: nothing rewritten
    assert ours.stat().st_mtime_ns == before
    ours.write_text(
        "deb http://snapshot.debian.org/archive/debian bookworm-backports main\n"
    )  # broken by hand
    _apt_sh(etc, "ensure_backports bookworm")
    assert [ln for ln in ours.read_text().splitlines() if not ln.startswith("#")] == lines


def test_backports_left_to_the_system_when_it_has_them(tmp_path):
    etc = _etc(
        tmp_path,
        {
            "sources.list.d/debian.sources": DEB822.replace(
                "bookworm bookworm-updates", "bookworm bookworm-backports"
            ),
            "sources.list.d/qwen35-mobile-backports.list": "deb http://mirror.example/debian bookworm-backports main\n",
        },
    )
    _apt_sh(etc, "ensure_backports bookworm")
    assert not (etc / "sources.list.d/qwen35-mobile-backports.list").exists()
    # a commented-out backports line does not count as having them
    etc2 = _etc(
        tmp_path / "b",
        {
            "sources.list": "deb http://m.example/debian bookworm main\n"
            "# deb http://m.example/debian bookworm-backports main\n"
        },
    )
    _apt_sh(etc2, "ensure_backports bookworm")
    assert (etc2 / "sources.list.d/qwen35-mobile-backports.list").exists()


def test_aarch64_sysroot_runs_this_checkout():
    """The sysroot's qwen35_mobile is a link to this checkout (never a stale
    copy or an old path): a moved checkout relinks on the next set-up."""
    import os

    from conftest import need

    sysroot = ROOT / ".emulators/aarch64-sysroot"
    need(
        not (sysroot / "usr/bin/python3.11").exists()
        and "scripts/setup_emulators.sh aarch64 sets it up",
        "the aarch64 sysroot",
    )
    link = sysroot / "usr/lib/python3/dist-packages/qwen35_mobile"
    assert link.is_symlink(), f"{link} is not a link to this checkout"
    assert Path(os.readlink(link)) == ROOT
    stamp = (ROOT / ".emulators/aarch64-sysroot/.stamp").read_text()
    assert f"root={ROOT}" in stamp
