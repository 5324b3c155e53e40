"""Artifact directories: written atomically, described by ``manifest.json``.

An artifact is what an app team pulls from CI: the model library, the
weights (MLC tensor cache), ``mlc-chat-config.json``, the tokenizer files and
the manifest, which records what built it and the sha256 of every file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# What reads an artifact lives on the runtime side (bindings/artifact.py); re-exported here.
from ..bindings.artifact import (  # noqa: F401
    BUILD_INFO,
    FORMAT_VERSION,
    MANIFEST,
    read_manifest,
    sha256_file,
    versions,
    written_after_build,
)
from ..errors import UserError

# Errors that mean the disk (or a limit on it) is full, and the words by which
# a compiler or linker run as a subprocess (TVM raises its output) reports them.
NO_SPACE_ERRNOS = {
    errno.ENOSPC: ("the device is full", "free some space"),
    errno.EFBIG: ("a file exceeded the file-size limit, ulimit -f", "raise the limit"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or raise the quota"),
}
_NO_SPACE_WORDS = {
    os.strerror(errno.ENOSPC): errno.ENOSPC,
    os.strerror(errno.EFBIG): errno.EFBIG,
    "File size limit exceeded": errno.EFBIG,
    os.strerror(errno.EDQUOT): errno.EDQUOT,
}
# Siblings of OUT that atomic_directory makes: tempfile.mkdtemp's names end in 8 of [a-z0-9_].
_SIBLING = r"\.{name}\.(partial|old)-[a-z0-9_]{{8}}"


def no_space(exc: BaseException) -> int | None:
    """The errno (ENOSPC, EFBIG or EDQUOT) if ``exc`` says that the disk is
    full: an ``OSError``, or an error whose text carries a subprocess's report
    (``ld: final link failed: No space left on device``, ``terminated with
    signal 25 [File size limit exceeded]``), also down its ``__cause__``/``__context__``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
            return exc.errno
        text = str(exc)
        for words, code in _NO_SPACE_WORDS.items():
            if words in text:
                return code
        exc = exc.__cause__ or exc.__context__
    return None


# Room for a model library while TVM writes it (the tiny host .so is 1.5 MB, a
# device .tar under 1 MB), in the temporary directory and in OUT.
LIBRARY_BYTES = 16 << 20


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.0f} MB" if n >= 1 << 20 else f"{n} bytes"


def check_space(out: Path, nbytes: int) -> None:
    """Fail before a long build where it could not be written: fewer than
    ``nbytes`` (weights, tokenizer) plus :data:`LIBRARY_BYTES` free beside
    ``out``, too little in the temporary directory, or a file-size limit
    (``ulimit -f``) below :data:`LIBRARY_BYTES`.  TVM's LLVM writes the
    library's object files into the temporary directory and ends the process
    when such a write fails, past any clean-up; other writes that fail later
    (the disk fills meanwhile) are caught by :func:`atomic_directory`."""
    out = Path(os.path.abspath(out))
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and soft < LIBRARY_BYTES:
        raise UserError(
            f"{out}: no space left (the file-size limit, ulimit -f, is {_mb(soft)}, below the "
            f"{_mb(LIBRARY_BYTES)} a model library may take); nothing was written"
        )
    for where, need in (
        (out.parent, nbytes + LIBRARY_BYTES),
        (Path(tempfile.gettempdir()), LIBRARY_BYTES),
    ):
        stat = os.statvfs(where)
        free = stat.f_bavail * stat.f_frsize
        if free < need:
            raise UserError(
                f"{out}: no space left ({where} has {_mb(free)} free, this compile needs about "
                f"{_mb(need)} there); nothing was written (free some space and try again)"
            )


def lock_path(out: Path) -> Path:
    """The lock file of ``out``: ``.OUT.lock`` beside it."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``out`` (an ``flock`` on ``.OUT.lock``, which
    the kernel releases when the process dies, however it dies) while the block
    runs.  Fail-fast: if another process holds it, raise a :class:`UserError`
    naming that process's pid (written into the lock file).  The lock file is
    removed on release; a process that locked a file since removed retries."""
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise UserError(
                f"{out} is being written by another qwen35-mobile process "
                f"({'pid ' + holder if holder.isdigit() else 'pid unknown'}, holding {path}); "
                "wait for it to finish or write elsewhere"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:  # locked; but is it still the file at `path` (its last holder removes it)?
            still = os.stat(path)
            mine = os.fstat(fd)
            if (still.st_dev, still.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked: nobody can have taken it meanwhile
        os.close(fd)


def stale_siblings(out: Path) -> list[Path]:
    """``.OUT.partial-*`` and ``.OUT.old-*`` beside ``out``.  Whoever holds
    ``out``'s lock owns no such directory yet, and only a lock holder makes
    them, so while the lock is held every one of them is left over from a
    process that died (SIGKILL, power loss) before it could remove it."""
    out = Path(os.path.abspath(out))
    pattern = re.compile(_SIBLING.format(name=re.escape(out.name)))
    try:
        return sorted(p for p in out.parent.iterdir() if pattern.fullmatch(p.name))
    except FileNotFoundError:
        return []


def _remove(path: Path, attempts: int = 20) -> None:
    """Remove a directory tree (or a file).  Retries a little: a compiler or
    linker that outlived an interrupted TVM call may still add a file."""
    for _ in range(attempts):
        if not os.path.lexists(path):
            return
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        if os.path.lexists(path):
            time.sleep(0.05)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if (
        renameat2(
            at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), ctypes.c_uint(rename_exchange)
        )
        == 0
    ):
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@contextlib.contextmanager
def atomic_directory(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; rename it to ``out`` when
    the block succeeds.  On any failure (or Ctrl-C, or SIGTERM through the
    CLI) nothing named ``out`` appears and the temporary directory is removed;
    with ``force`` an existing ``out`` is swapped for the new one in one step,
    so ``out`` is at every instant the old or the new artifact, never a mix.

    Faults: the whole block holds ``out``'s lock (:func:`output_lock`), so a
    second writer of the same ``out`` fails at once naming the first.  Under
    the lock, the ``.OUT.partial-*`` / ``.OUT.old-*`` directories of writers
    that were killed (SIGKILL leaves them) are removed first.  A full disk
    (ENOSPC, EFBIG from a file-size limit, EDQUOT), in this process or in a
    compiler it runs, becomes one :class:`UserError` naming ``out``."""
    out = Path(out)
    target = Path(os.path.abspath(out))
    if not target.name:
        raise UserError(f"{out}: cannot be an artifact directory")
    try:
        if target.exists() and not force:
            raise UserError(f"{out} already exists (pass --force to replace it)")
        target.parent.mkdir(parents=True, exist_ok=True)
        with output_lock(target):
            if target.exists() and not force:  # again, now that nobody else writes it
                raise UserError(f"{out} already exists (pass --force to replace it)")
            for stale in stale_siblings(target):
                _remove(stale)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(
                0o777 & ~umask
            )  # mkdtemp makes it 0700; an artifact is as readable as any folder
            try:
                yield tmp
                if not os.path.lexists(target):
                    os.replace(tmp, target)
                elif not _exchange(tmp, target):  # tmp now holds the old artifact, removed below
                    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                    os.replace(target, trash / "old")
                    os.replace(tmp, target)
                    _remove(trash)
            finally:
                _remove(tmp)
    except UserError:
        raise
    except Exception as e:
        code = no_space(e)
        if code is None:
            raise
        where = f" writing {e.filename}" if isinstance(e, OSError) and e.filename else ""
        reason, advice = NO_SPACE_ERRNOS[code]
        raise UserError(
            f"{out}: no space left ({reason}{where}); nothing was written ({advice} and try again)"
        ) from None


def write_manifest(directory: Path, manifest: dict) -> dict:
    """Add the sha256 and size of every file (but the manifest and the files
    written after the build, such as ``build-info.json``) and write it."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(directory).as_posix()
        if written_after_build(rel):
            continue
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"format_version": FORMAT_VERSION, **manifest, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_build_info(directory: Path, info: dict) -> None:
    """``build-info.json``: the facts of this one build (time, host, paths,
    durations), which would make two builds of the same inputs differ, so
    the manifest neither holds nor lists them."""
    (directory / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
