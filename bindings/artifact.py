"""Reading an artifact directory, and checking that it is what its build made.

An artifact's identity is ``manifest.json``: what it is (model, target,
quantization, versions, exported functions, parameters) and the sha256 and
size of every file the build wrote.  Two builds of the same inputs give the
same manifest and the same files, byte for byte.  What differs from one build
to the next (when, where, how long, from which absolute path) goes into
``build-info.json``, which no manifest lists.

:func:`verify` checks an artifact against its manifest: every listed file
(size, sha256), files nobody listed, the tensor cache against the manifest's
parameters, the manifest itself and the parts of the runtime contract that
concern integrity.  Whether this machine can run it is reported apart
(:attr:`Verification.runs_here`): a device build is verifiable anywhere.
``Model.load`` runs the cheap part (``full=False``: the weight shards by size
only; the loader checks their md5 as it reads them).

This module is the runtime side's: nothing here imports ``compile/``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import math
from pathlib import Path

from ..errors import UserError

MANIFEST = "manifest.json"
BUILD_INFO = "build-info.json"
TENSOR_CACHE = "tensor-cache.json"
CHAT_CONFIG = "mlc-chat-config.json"
# 2: build facts (time, host, paths, durations) moved out of the manifest into
# build-info.json; ``model`` is a name, not a path.
FORMAT_VERSION = 2

#: Files written into an artifact after its build, which its manifest cannot list.
WRITTEN_AFTER_BUILD = (BUILD_INFO, "parity*.json", "parity*.png", "release-inputs.json")

#: Manifest keys every reader relies on, with their JSON types.
REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "model": str,
    "target": str,
    "device": str,
    "host_triple": str,
    "native_cpu": bool,
    "tvm_target": dict,
    "quantization": str,
    "dtype": str,
    "library": str,
    "versions": dict,
    "exported_functions": list,
    "parameters": list,
    "weights": (dict, type(None)),
    "files": dict,
}

# Sizes of the tensor cache's dtypes, for the byte counts of its records.
_ITEMSIZE = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "uint64": 8,
}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def read_manifest(directory: Path) -> dict:
    """The manifest of an artifact directory, or a :class:`UserError` that
    says in one line why there is none."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise UserError(f"{directory}: no such artifact directory")
    if not path.exists():
        raise UserError(
            f"{directory}: not an artifact (no {MANIFEST}); compile one with `qwen35-mobile compile`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: corrupt manifest ({_one_line(e)})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: corrupt manifest (not a JSON object)")
    return manifest


def read_build_info(directory: Path) -> dict | None:
    """``build-info.json`` (when, where and how long the build took), or None."""
    try:
        return json.loads((Path(directory) / BUILD_INFO).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def versions() -> dict[str, str]:
    """Versions of the tools that build (or run) an artifact."""
    from importlib.metadata import version

    from .. import __version__

    return {
        "qwen35_mobile": __version__,
        "tvm": version("apache-tvm"),
        "tvm_ffi": version("apache-tvm-ffi"),
    }


def written_after_build(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in WRITTEN_AFTER_BUILD)


# ---- checks -------------------------------------------------------------------
# Each returns problems as (file name inside the artifact, what is wrong); a
# file with a problem of its own (JSON that does not parse, a tensor-cache
# record that disagrees with the manifest) is not reported again as "sha256
# differs": one problem, one line.


def _manifest_problems(manifest: dict) -> list[tuple[str, str]]:
    problems = []
    for key, kind in REQUIRED_KEYS.items():
        if key not in manifest:
            problems.append((MANIFEST, f"lacks the key '{key}'"))
        elif not isinstance(manifest[key], kind) or (
            kind is int and isinstance(manifest[key], bool)
        ):
            problems.append(
                (MANIFEST, f"'{key}' is {type(manifest[key]).__name__}, not {_kind_name(kind)}")
            )
    if isinstance(manifest.get("versions"), dict):
        for key in ("tvm", "tvm_ffi"):
            if not isinstance(manifest["versions"].get(key), str) or not manifest["versions"][key]:
                problems.append((MANIFEST, f"records no {key} version under 'versions'"))
    if isinstance(manifest.get("files"), dict):
        for name, entry in manifest["files"].items():
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("bytes"), int)
            ):
                problems.append(
                    (MANIFEST, f"the entry of '{name}' under 'files' lacks its sha256 or bytes")
                )
            elif Path(name).is_absolute() or ".." in Path(name).parts:
                problems.append(
                    (MANIFEST, f"'files' names '{name}', which is outside the artifact")
                )
    if isinstance(manifest.get("parameters"), list):
        for i, p in enumerate(manifest["parameters"]):
            if not _parameter_ok(p):
                problems.append((MANIFEST, f"parameter #{i} is not {{name, shape, dtype}}"))
                break
    return problems


def _parameter_ok(p) -> bool:
    return (
        isinstance(p, dict)
        and isinstance(p.get("name"), str)
        and isinstance(p.get("dtype"), str)
        and isinstance(p.get("shape"), list)
        and all(isinstance(d, int) for d in p["shape"])
    )


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {
        int: "an integer",
        str: "a string",
        dict: "an object",
        list: "a list",
        type(None): "null",
    }
    return " or ".join(names[k] for k in kinds)


#: The TVM devices a library of this tool runs on (the manifest's ``device``).
KNOWN_DEVICES = ("cpu", "opencl", "metal", "webgpu", "cuda", "vulkan")
#: A library is a shared object (loaded by the runtime) or a static archive (linked into an app).
LIBRARY_KINDS = (".so", ".tar")


def _contract_problems(manifest: dict) -> list[tuple[str, str]]:
    """The runtime contract, as far as it concerns integrity (any machine);
    read from the manifest alone (the runtime knows no compiler presets)."""
    problems = []
    device = manifest.get("device")
    if isinstance(device, str) and device not in KNOWN_DEVICES:
        problems.append(
            (MANIFEST, f"names device '{device}', which is none of {', '.join(KNOWN_DEVICES)}")
        )
    library = manifest.get("library")
    if isinstance(library, str):
        if not library.endswith(LIBRARY_KINDS):
            problems.append(
                (MANIFEST, f"names the library '{library}', which is neither a .so nor a .tar")
            )
        if isinstance(manifest.get("files"), dict) and library not in manifest["files"]:
            problems.append((library, "the library is not listed under the manifest's 'files'"))
        if library.endswith(".tar") and not isinstance(manifest.get("system_lib_prefix"), str):
            problems.append((MANIFEST, "a static library without its 'system_lib_prefix'"))
    return problems


def _json_problem(path: Path, required: tuple[str, ...] = ()) -> str | None:
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"not valid JSON ({_one_line(e)})"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if required:
        if not isinstance(data, dict):
            return "not a JSON object"
        absent = [key for key in required if key not in data]
        if absent:
            return f"lacks the key '{absent[0]}'"
    return None


# JSON files of the artifact and the keys their readers need.
_JSON_FILES = {
    CHAT_CONFIG: ("model_config", "vocab_size", "context_window_size", "prefill_chunk_size"),
    "tokenizer_config.json": (),
}


def _tensor_cache(artifact: Path, manifest: dict) -> tuple[list[tuple[str, str]], set[str]]:
    """Problems of ``tensor-cache.json`` against the manifest's parameters, and
    the shard files it names."""
    path = artifact / TENSOR_CACHE
    params = manifest["parameters"]  # well-formed: checked by the caller
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    if not path.exists():
        if (
            manifest.get("weights") and TENSOR_CACHE not in files
        ):  # a listed one is reported missing already
            return [(TENSOR_CACHE, "missing, but the manifest records weights")], set()
        return [], set()
    if manifest.get("weights") is None:
        return [(TENSOR_CACHE, "present, but the manifest records no weights")], set()
    try:
        shards = json.loads(path.read_text())["records"]
        if not isinstance(shards, list):
            raise TypeError("'records' is not a list")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        return [(TENSOR_CACHE, f"not a valid tensor cache index ({_one_line(e)})")], set()

    expected = {p["name"]: p for p in params}
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    shard_files: set[str] = set()
    for s, shard in enumerate(shards):
        try:
            data_path, records, nbytes = shard["dataPath"], shard["records"], int(shard["nbytes"])
            shard_files.add(data_path)
            for rec in records:
                name, shape, dtype = rec["name"], rec["shape"], rec["dtype"]
                offset, size = int(rec["byteOffset"]), int(rec["nbytes"])
                problem = None
                if name in seen:
                    problem = f"holds parameter '{name}' twice"
                elif name not in expected:
                    problem = f"holds '{name}', which is not a parameter in the manifest"
                elif list(shape) != expected[name]["shape"]:
                    problem = f"parameter '{name}' has shape {list(shape)} but the manifest says {expected[name]['shape']}"
                elif dtype != expected[name]["dtype"]:
                    problem = f"parameter '{name}' has dtype {dtype} but the manifest says {expected[name]['dtype']}"
                elif (
                    rec.get("format", "raw") == "raw"
                    and dtype in _ITEMSIZE
                    and size != math.prod(shape) * _ITEMSIZE[dtype]
                ):
                    problem = f"parameter '{name}': {size} bytes do not hold {dtype} {list(shape)}"
                elif offset < 0 or offset + size > nbytes:
                    problem = f"parameter '{name}' lies past the end of {data_path}"
                seen.add(name)
                if problem:
                    problems.append((TENSOR_CACHE, problem))
        except (KeyError, TypeError, ValueError) as e:
            problems.append(
                (TENSOR_CACHE, f"shard record #{s} is malformed ({_one_line(repr(e))})")
            )
    absent = [name for name in expected if name not in seen]
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        problems.append((TENSOR_CACHE, f"lacks parameter '{absent[0]}'{more}"))
    return problems, shard_files


@dataclasses.dataclass
class Verification:
    artifact: Path
    manifest: dict | None
    problems: list[str]  # one line each, naming the file
    runs_here: str | None = None  # None if not asked; "" when it runs here; else why not

    @property
    def ok(self) -> bool:
        return not self.problems


def _lines(artifact: Path, found: list[tuple[str, str]]) -> list[str]:
    return [f"{artifact / name}: {what}" for name, what in found]


def header_problems(artifact: Path, manifest: dict) -> list[str]:
    """The manifest itself: its format version (nothing else is checked when
    it differs) and the keys every reader relies on."""
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        return [
            f"{Path(artifact) / MANIFEST}: artifact format {version} is not {FORMAT_VERSION} (this tool's); recompile it"
        ]
    return _lines(Path(artifact), _manifest_problems(manifest))


def content_problems(artifact: Path, manifest: dict, *, full: bool = True) -> list[str]:
    """Everything but the manifest's own keys: the contract's integrity part,
    every listed file (size; sha256, of the weight shards only if ``full``),
    the JSON files, the tensor cache against the parameters and, if ``full``,
    files present but not listed."""
    artifact = Path(artifact)
    found: list[tuple[str, str]] = _contract_problems(manifest)
    # Compared with the parameters only when the manifest has them (a missing key is its own problem).
    cache_problems, shard_files = (
        _tensor_cache(artifact, manifest)
        if isinstance(manifest.get("parameters"), list)
        and all(map(_parameter_ok, manifest["parameters"]))
        and isinstance(manifest.get("weights", 0), (dict, type(None)))
        else ([], set())
    )
    specific = {name for name, _ in cache_problems}
    json_problems = []
    for name, required in _JSON_FILES.items():
        if (artifact / name).exists():
            problem = _json_problem(artifact / name, required)
            if problem:
                json_problems.append((name, problem))
                specific.add(name)

    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    for name, entry in sorted(files.items()):
        if not isinstance(entry, dict) or Path(name).is_absolute() or ".." in Path(name).parts:
            continue  # reported with the manifest
        path = artifact / name
        if not path.is_file():
            found.append((name, "missing (the manifest lists it)"))
            continue
        if name in specific:
            continue  # its own problem says more than "altered"
        size = path.stat().st_size
        if size != entry.get("bytes"):
            found.append(
                (
                    name,
                    f"sha256 and size do not match the manifest ({size} bytes, the build wrote "
                    f"{entry.get('bytes')}): altered or truncated since the build",
                )
            )
        elif (
            full or not (name in shard_files or fnmatch.fnmatchcase(name, "params_shard_*.bin"))
        ) and sha256_file(path) != entry.get("sha256"):
            found.append(
                (name, "sha256 does not match the manifest: altered or corrupted since the build")
            )
    found += cache_problems + json_problems

    if full:
        for path in sorted(p for p in artifact.rglob("*") if p.is_file() or p.is_symlink()):
            name = path.relative_to(artifact).as_posix()
            if name != MANIFEST and name not in files and not written_after_build(name):
                found.append((name, "not listed in the manifest (the build did not write it)"))
    return _lines(artifact, found)


def verify(
    artifact: str | Path, *, full: bool = True, check_runnable: bool = False
) -> Verification:
    """Check an artifact against its manifest; every problem is one line that
    names the file.  ``full``: also the sha256 of the weight shards, and files
    present but not listed; without it the shards are checked by size only
    (the loader checks their md5).  ``check_runnable``: say in
    :attr:`Verification.runs_here` whether this machine can run it (never a
    problem: a device build is verifiable anywhere)."""
    artifact = Path(artifact)
    try:
        manifest = read_manifest(artifact)
    except UserError as e:
        return Verification(artifact, None, [str(e)])
    problems = header_problems(artifact, manifest)
    if manifest.get("format_version") == FORMAT_VERSION:
        problems += content_problems(artifact, manifest, full=full)
    result = Verification(artifact, manifest, problems)
    if check_runnable and manifest.get("format_version") == FORMAT_VERSION:
        from .contract import why_not_runnable

        try:
            result.runs_here = why_not_runnable(manifest) or ""
        except Exception as e:  # noqa: BLE001 - a broken runtime here says nothing about the artifact
            result.runs_here = f"cannot tell ({type(e).__name__}: {_one_line(e)})"
    return result
