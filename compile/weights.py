"""Checkpoint reading and weight conversion.

A Hugging Face checkpoint (one ``model.safetensors`` or a sharded
``model.safetensors.index.json``) is opened by reading only the safetensors
headers; tensors are loaded one at a time.  :func:`convert_checkpoint` maps the
checkpoint names to our parameter names (``docs/design.md``), checks shapes and
dtypes against what the model expects, casts, and streams the result into an
MLC-style tensor cache, the layout of ``tvm.contrib.tvmjs.dump_tensor_cache``:

    out_dir/tensor-cache.json
    out_dir/params_shard_0.bin, params_shard_1.bin, ...

``tensor-cache.json`` holds ``{"metadata": {"ParamSize", "ParamBytes",
"BitsPerParam"}, "records": [shard, ...]}``; each shard is ``{"dataPath",
"format": "raw-shard", "nbytes", "records", "md5sum"}`` and each of its records
``{"name", "shape", "dtype", "format": "raw", "nbytes", "byteOffset"}``.
:func:`load_tensor_cache` reads such a cache back, a shard at a time, checking
each shard's size and md5.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from ..bindings.tensor_cache import CACHE_FILE, load_tensor_cache  # noqa: F401 (the reader is the runtime's)
from ..errors import UserError
from .quantization import VISION_PREFIX

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PREFIX = "params_shard_"
SHARD_BYTES = 32 << 20  # MLC's shard cap: 32 MiB

LM_HEAD = "lm_head.weight"


@dataclasses.dataclass(frozen=True)
class NameRule:
    """One row of :data:`NAME_TABLE`.  ``pattern`` names checkpoint tensors:
    one exact name, or a prefix followed by ``*``.  ``param`` is the compiled
    parameter they become, exact or with a ``*`` that stands for what the
    pattern's ``*`` matched; ``None``: the tensors are skipped (counted, not
    converted) for ``reason``."""

    pattern: str
    param: str | None
    reason: str = ""

    @property
    def prefix(self) -> str:
        """The pattern without its ``*``: the key of its count in ``skipped``."""
        return self.pattern.removesuffix("*")

    def matches(self, name: str) -> bool:
        return name.startswith(self.prefix) if self.pattern.endswith("*") else name == self.pattern

    def param_for(self, name: str) -> str:
        """The compiled name of checkpoint tensor ``name`` (which matches)."""
        if not self.pattern.endswith("*"):
            return self.param
        return self.param.replace("*", name[len(self.prefix) :])

    def name_for(self, param: str) -> str | None:
        """The checkpoint name that becomes ``param`` under this row, or None."""
        if self.param is None:
            return None
        if not self.param.endswith("*"):
            return self.pattern if param == self.param else None
        head = self.param.removesuffix("*")
        return self.prefix + param[len(head) :] if param.startswith(head) else None


# Every checkpoint tensor, by the first row its name matches: which compiled
# parameter it becomes, or why it is skipped (the manifest's ``not_compiled``).
# A tensor no row matches is one the model does not use (an error).
NAME_TABLE: tuple[NameRule, ...] = (
    NameRule("model.visual.*", "visual.*"),  # the vision tower (image_embed)
    NameRule("mtp.*", None, "multi-token-prediction head: weights skipped, not compiled yet"),
    NameRule(LM_HEAD, LM_HEAD),  # top level in both layouts; untied models only
    NameRule("model.language_model.*", "*"),  # Qwen3_5ForConditionalGeneration
    NameRule("model.*", "*"),  # Qwen3_5ForCausalLM
)


def not_compiled(vision: bool = True, table: tuple[NameRule, ...] = NAME_TABLE) -> dict[str, str]:
    """The skipped rows: checkpoint-name pattern -> why (the manifest's
    ``not_compiled``); ``vision=False``: a build without the tower skips it too."""
    out = {rule.pattern: rule.reason for rule in table if rule.param is None}
    if not vision:
        out["model.visual.*"] = "vision tower: built without it (compile --no-vision)"
    return out


# safetensors dtype codes numpy can hold (little-endian, as stored).
_NUMPY_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
    "C64": np.dtype("<c8"),
}
# Source dtypes that convert to float32/float16 by a plain cast.  FP8 tensors
# are refused: they need the block scales of a quantized checkpoint.
_CONVERTIBLE = ("F32", "F16", "BF16", "F64")
_TARGET_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
_MAX_HEADER_BYTES = 100 << 20  # the limit of the safetensors library
_LIST_LIMIT = 8  # names shown in an error message before "and N more"

Progress = Callable[[int, int, str], None]


def _some(names: list[str]) -> str:
    """``'a', 'b', 'c' (and 5 more)`` for error messages."""
    shown = ", ".join(f"'{n}'" for n in names[:_LIST_LIMIT])
    more = len(names) - _LIST_LIMIT
    return shown + (f" (and {more} more)" if more > 0 else "")


# ---------------------------------------------------------------------------
# Reading a checkpoint
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one checkpoint tensor lives; ``dtype`` is the safetensors code
    (``"BF16"``, ``"F32"``, ...) and ``offset`` is absolute in ``file``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check that the file is exactly as long
    as the header's data offsets say; errors name the file."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise UserError(f"{file}: {size} bytes, too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise UserError(
                    f"{file}: header length {header_len} does not fit in the file ({size} bytes); "
                    "the file is truncated or not a safetensors file"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise UserError(f"{file}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{file}: safetensors header is not a JSON object")

    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            valid = (
                isinstance(dtype, str)
                and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(begin, int)
                and isinstance(end, int)
                and 0 <= begin <= end
            )
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise UserError(
                f"{file}: safetensors header entry for tensor '{name}' is malformed: {entry!r}"
            )
        np_dtype = _NUMPY_DTYPES.get(dtype)
        if np_dtype is not None and end - begin != math.prod(shape) * np_dtype.itemsize:
            raise UserError(
                f"{file}: tensor '{name}' ({dtype} {tuple(shape)}) spans {end - begin} bytes, "
                f"expected {math.prod(shape) * np_dtype.itemsize}"
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), file, data_start + begin, end - begin)
        data_end = max(data_end, end)
    if size - data_start != data_end:
        kind = "truncated" if size - data_start < data_end else "longer than its header says"
        raise UserError(
            f"{file}: {kind}: the header describes {data_end} data bytes but the file holds "
            f"{size - data_start}"
        )
    return tensors


class Checkpoint:
    """A Hugging Face safetensors checkpoint, opened by its headers only.

    ``tensors`` maps every checkpoint tensor name to its :class:`TensorInfo`.
    The name mapping to our parameter names (``table``, :data:`NAME_TABLE`) is
    applied on opening: ``params`` (our name -> checkpoint name), ``skipped``
    (a skipped row's prefix, e.g. ``model.visual.``, -> count of its tensors)
    and ``unmapped`` (names that fit no row).
    """

    def __init__(
        self, path: Path, tensors: dict[str, TensorInfo], table: tuple[NameRule, ...] = NAME_TABLE
    ):
        self.path = path
        self.tensors = tensors
        self.table = table
        self.params: dict[str, str] = {}
        self.skipped: dict[str, int] = {}
        self.unmapped: list[str] = []
        self._used: set[NameRule] = set()  # the rows some tensor matched: this checkpoint's layout
        for name in tensors:
            rule = next((r for r in table if r.matches(name)), None)
            if rule is None:
                self.unmapped.append(name)
                continue
            self._used.add(rule)
            if rule.param is None:
                self.skipped[rule.prefix] = self.skipped.get(rule.prefix, 0) + 1
                continue
            param = rule.param_for(name)
            if param in self.params:
                raise UserError(
                    f"{path}: tensors '{self.params[param]}' and '{name}' both map to parameter '{param}'"
                )
            self.params[param] = name

    def names(self) -> list[str]:
        """All checkpoint tensor names."""
        return list(self.tensors)

    def hf_name(self, param: str) -> str:
        """The checkpoint name under which parameter ``param`` is looked for:
        the tensor that maps to it, else the name the most specific row that
        can produce it gives (of equals, a row this checkpoint's tensors
        matched, e.g. ``model.`` for a bare text checkpoint; then table order)."""
        if param in self.params:
            return self.params[param]
        candidates = [(r, name) for r in self.table if (name := r.name_for(param)) is not None]
        if not candidates:
            raise UserError(f"no checkpoint tensor maps to parameter '{param}'")

        def rank(candidate: tuple[NameRule, str]) -> tuple[int, bool]:
            rule = candidate[0]  # specificity: the literal length of its param
            return len(rule.param) - rule.param.endswith("*"), rule in self._used

        return max(candidates, key=rank)[1]  # the first of equals: table order

    def get(self, name: str) -> np.ndarray:
        """Load one tensor by its checkpoint name (a fresh, writable array)."""
        info = self.tensors.get(name)
        if info is None:
            raise UserError(f"{self.path}: checkpoint has no tensor '{name}'")
        dtype = _NUMPY_DTYPES.get(info.dtype)
        if dtype is None:
            raise UserError(
                f"{info.file}: tensor '{name}' has dtype {info.dtype}, which cannot be read"
            )
        buf = np.empty(info.nbytes, np.uint8)
        try:
            with open(info.file, "rb") as f:
                f.seek(info.offset)
                got = f.readinto(buf)
        except OSError as e:
            raise UserError(f"{info.file}: cannot read ({e.strerror})") from None
        if got != info.nbytes:
            raise UserError(f"{info.file}: truncated while reading tensor '{name}'")
        return buf.view(dtype).reshape(info.shape)


def open_checkpoint(ckpt_dir: str | Path, table: tuple[NameRule, ...] = NAME_TABLE) -> Checkpoint:
    """Open a checkpoint directory holding ``model.safetensors`` or
    ``model.safetensors.index.json`` and its shards; reads headers only.
    ``table``: the name mapping (:data:`NAME_TABLE`).

    Raises :class:`UserError` naming the file for a missing file, an index
    that names a missing shard or a tensor its shard lacks, an invalid header,
    or a file whose size does not match its header.
    """
    path = Path(ckpt_dir)
    if not path.is_dir():
        raise UserError(f"{path}: not a checkpoint directory")
    index_file = path / INDEX_FILE
    if not index_file.exists():
        single = path / SINGLE_FILE
        if not single.exists():
            raise UserError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        return Checkpoint(path, _read_header(single), table)

    try:
        weight_map = json.loads(index_file.read_text()).get("weight_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"{index_file}: not a valid safetensors index ({e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index_file}: 'weight_map' must map tensor names to file names")
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    tensors: dict[str, TensorInfo] = {}
    for file, names in by_file.items():
        shard = path / file
        if not shard.is_file():
            raise UserError(f"{index_file}: shard '{file}' (holding {_some(names)}) does not exist")
        header = _read_header(shard)
        absent = [n for n in names if n not in header]
        if absent:
            raise UserError(
                f"{index_file}: maps {_some(absent)} to '{file}', which does not contain them"
            )
        tensors.update((n, header[n]) for n in names)
    return Checkpoint(path, tensors, table)


# ---------------------------------------------------------------------------
# Writing the tensor cache
# ---------------------------------------------------------------------------


class _ShardWriter:
    """Streams tensors into ``params_shard_{N}.bin`` files of at most
    ``cap`` bytes; a tensor larger than ``cap`` gets a shard of its own.  The
    md5 is computed while writing, so nothing is buffered."""

    def __init__(self, out_dir: Path, cap: int):
        self.out_dir = out_dir
        self.cap = cap
        self.shards: list[dict] = []
        self._file = None
        self._md5 = None
        self._records: list[dict] = []
        self._nbytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        if self._file is not None and self._nbytes + data.nbytes > self.cap:
            self._close()
        if self._file is None:
            self._open()
        self._records.append(
            {
                "name": name,
                "shape": list(array.shape),
                "dtype": str(array.dtype),
                "format": "raw",
                "nbytes": data.nbytes,
                "byteOffset": self._nbytes,
            }
        )
        self._file.write(data)
        self._md5.update(data)
        self._nbytes += data.nbytes
        if self._nbytes >= self.cap:
            self._close()

    def finish(self) -> list[dict]:
        """Close the last shard; returns the shard records."""
        if self._file is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        """Close the open shard after a failed write (a full disk), dropping
        what its buffer still holds, so that the error is raised once."""
        if self._file is not None:
            file, self._file = self._file, None
            with contextlib.suppress(OSError):
                file.close()

    def _open(self) -> None:
        self._file = open(self.out_dir / f"{SHARD_PREFIX}{len(self.shards)}.bin", "wb")
        self._md5 = hashlib.md5()
        self._records = []
        self._nbytes = 0

    def _close(self) -> None:
        self._file.close()
        self.shards.append(
            {
                "dataPath": f"{SHARD_PREFIX}{len(self.shards)}.bin",
                "format": "raw-shard",
                "nbytes": self._nbytes,
                "records": self._records,
                "md5sum": self._md5.hexdigest(),
            }
        )
        self._file = None


def _cast(array: np.ndarray, target: np.dtype, hf_name: str) -> np.ndarray:
    """Cast to the target dtype, refusing values that overflow float16."""
    with np.errstate(over="ignore"):
        out = array.astype(target, copy=False)
    if target == np.float16 and array.dtype != np.float16:
        if np.count_nonzero(np.isinf(out)) > np.count_nonzero(np.isinf(array)):
            peak = float(np.max(np.abs(array.astype(np.float32))))
            raise UserError(
                f"tensor '{hf_name}' has values beyond the float16 range (max |x| = {peak:g}); "
                "convert it to float32"
            )
    return out


def _plan(
    ckpt: Checkpoint, expected: Mapping[str, tuple[tuple[int, ...], str]]
) -> list[tuple[str, str, np.dtype]]:
    """Check the checkpoint against the expected parameters before writing
    anything; returns (param, checkpoint name, target dtype) in order."""
    plan = []
    missing = []
    for param, (shape, dtype) in expected.items():
        if dtype not in _TARGET_DTYPES:
            raise ValueError(
                f"parameter '{param}': target dtype must be float32 or float16, got {dtype!r}"
            )
        hf = ckpt.hf_name(param)
        info = ckpt.tensors.get(hf)
        if info is None:
            missing.append(hf)
            continue
        if info.shape != tuple(shape):
            raise UserError(
                f"tensor '{hf}' has shape {info.shape} but the config expects {tuple(shape)}"
            )
        if info.dtype not in _CONVERTIBLE:
            raise UserError(
                f"tensor '{hf}' has dtype {info.dtype}; only floating-point tensors "
                f"({', '.join(_CONVERTIBLE)}) can be converted"
            )
        plan.append((param, hf, _TARGET_DTYPES[dtype]))
    if missing:
        raise UserError(f"{ckpt.path}: checkpoint lacks tensor {_some(missing)}")
    tied = LM_HEAD not in expected
    # A build without the vision tower (compile --no-vision) leaves its tensors behind.
    tower = any(p.startswith(VISION_PREFIX) for p in expected)
    extra = [
        hf
        for p, hf in ckpt.params.items()
        if p not in expected
        and not (tied and p == LM_HEAD)
        and (tower or not p.startswith(VISION_PREFIX))
    ]
    extra += ckpt.unmapped
    if extra:
        raise UserError(
            f"{ckpt.path}: checkpoint has tensors the model does not use: {_some(extra)}"
        )
    return plan


def _left_behind_tower(ckpt: Checkpoint, expected) -> dict[str, int]:
    """{"model.visual.": count} when a build without the tower leaves its tensors."""
    if any(p.startswith(VISION_PREFIX) for p in expected):
        return {}
    n = sum(p.startswith(VISION_PREFIX) for p in ckpt.params)
    return {"model.visual.": n} if n else {}


def convert_checkpoint(
    ckpt: Checkpoint,
    expected: Mapping[str, tuple[tuple[int, ...], str]],
    out_dir: str | Path,
    *,
    progress: Progress | None = None,
    shard_bytes: int = SHARD_BYTES,
    quantize_map=None,
) -> dict:
    """Convert the checkpoint into a tensor cache in ``out_dir``.

    ``expected`` maps each parameter name to (shape, ``"float32"`` or
    ``"float16"``), in the order the cache is written.  Everything is checked
    before anything is written: a missing tensor, a wrong shape, a non-float
    dtype, or a checkpoint tensor the model does not use (other than those
    :data:`NAME_TABLE` skips, ``model.visual.*`` and ``mtp.*``, and
    ``lm_head.weight`` of a tied model) is a :class:`UserError`.  Tensors
    are then streamed one at a time; ``progress(done, total, name)`` is
    called after each.

    With ``quantize_map`` (a :class:`compile.quantization.QuantizeMap`), the
    tensors it lists are checked against their original shapes and stored
    group-quantized (packed weight + scales), one tensor at a time.

    Returns a JSON-able summary for the manifest: ``num_tensors``,
    ``num_params`` (elements), ``nbytes``, ``num_shards``, ``skipped``
    (a skipped row's prefix, ``model.visual.``, -> count) and ``ignored``
    (checkpoint names not converted).
    """
    originals = expected
    if quantize_map is not None:
        originals = {
            name: (shape, dtype) for name, shape, dtype, _ in quantize_map.sources(expected)
        }
    plan = _plan(ckpt, originals)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_file = out / CACHE_FILE
    cache_file.unlink(missing_ok=True)  # an interrupted run must not look complete

    writer = _ShardWriter(out, shard_bytes)
    num_params = nbytes = 0
    try:  # a failed write (ENOSPC, EFBIG) propagates as the OSError it is; the caller reports it
        for done, (param, hf, target) in enumerate(plan, start=1):
            array = ckpt.get(hf)
            if quantize_map is not None and param in quantize_map.param_map:
                try:
                    stored = quantize_map.convert(param, array)
                except (OverflowError, ValueError) as e:
                    raise UserError(f"tensor '{hf}': cannot quantize ({e})") from None
            else:
                stored = [(param, _cast(array, target, hf))]
            for name, data in stored:
                writer.add(name, data)
                nbytes += data.nbytes
            num_params += array.size
            del array, stored  # free them before the next tensor is loaded
            if progress is not None:
                progress(done, len(plan), param)
        shards = writer.finish()
    except BaseException:
        writer.abort()
        raise

    metadata = {
        "ParamSize": len(plan),
        "ParamBytes": nbytes,
        "BitsPerParam": nbytes * 8 / num_params if num_params else 0.0,
    }
    tmp = out / (CACHE_FILE + ".tmp")
    tmp.write_text(json.dumps({"metadata": metadata, "records": shards}, indent=4))
    os.replace(tmp, cache_file)
    for stale in out.glob(f"{SHARD_PREFIX}*.bin"):
        index = stale.name[len(SHARD_PREFIX) : -len(".bin")]
        if index.isdigit() and int(index) >= len(shards):
            stale.unlink()

    ignored = [LM_HEAD] if LM_HEAD in ckpt.params and LM_HEAD not in expected else []
    return {
        "num_tensors": len(plan),  # checkpoint tensors converted
        "num_params": num_params,
        "nbytes": nbytes,
        "num_shards": len(shards),
        "skipped": {**ckpt.skipped, **_left_behind_tower(ckpt, expected)},
        "ignored": ignored,
    }
