"""Artifact directories: written atomically, described by ``manifest.json``.

An artifact is what an app team pulls from CI: the model library, the
weights (MLC tensor cache), ``mlc-chat-config.json``, the tokenizer files and
the manifest, which records what built it and the sha256 of every file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import UserError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_directory(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; rename it to ``out`` when
    the block succeeds.  On any failure (or Ctrl-C) nothing named ``out``
    appears and the temporary directory is removed."""
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: dict) -> dict:
    """Add the sha256 and size of every file (but the manifest) and write it."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"format_version": FORMAT_VERSION, **manifest, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise UserError(f"{directory}: no such artifact directory")
    if not path.exists():
        raise UserError(f"{directory}: not an artifact (no {MANIFEST}); compile one with `qwen35-mobile compile`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: corrupt manifest ({e})") from None


def versions() -> dict[str, str]:
    """Versions of the tools that build (or run) an artifact."""
    from importlib.metadata import version

    from .. import __version__

    return {
        "qwen35_mobile": __version__,
        "tvm": version("apache-tvm"),
        "tvm_ffi": version("apache-tvm-ffi"),
    }
