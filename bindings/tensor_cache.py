"""The MLC tensor cache, read back: ``tensor-cache.json`` + ``params_shard_N.bin``
(written by compile/weights.py or by ``tvmjs.dump_tensor_cache``, including
its ``f32-to-bf16`` encoding).  The runtime's side: numpy and ml_dtypes only."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import UserError

CACHE_FILE = "tensor-cache.json"
_LIST_LIMIT = 8  # names shown in an error message before "and N more"


def _some(names: list[str]) -> str:
    """``'a', 'b', 'c' (and 5 more)`` for error messages."""
    shown = ", ".join(f"'{n}'" for n in names[:_LIST_LIMIT])
    more = len(names) - _LIST_LIMIT
    return shown + (f" (and {more} more)" if more > 0 else "")


def _cache_dtype(name: str, where: str) -> np.dtype:
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(name).newbyteorder("<")
    except TypeError:
        raise UserError(f"{where}: unknown dtype {name!r}") from None


def _read_shard(path: Path, shard: dict, verify: bool) -> bytearray:
    """Read one shard whole, checking its size and (if ``verify``) md5."""
    try:
        size = path.stat().st_size
        if size != shard["nbytes"]:
            raise UserError(
                f"{path}: {size} bytes but {CACHE_FILE} records {shard['nbytes']}; "
                "the shard is truncated or was not fully written"
            )
        data = bytearray(size)
        with open(path, "rb") as f:
            got = f.readinto(data)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if got != size:
        raise UserError(f"{path}: truncated while reading")
    if verify:
        digest = hashlib.md5(data).hexdigest()
        if digest != shard.get("md5sum"):
            raise UserError(
                f"{path}: md5 mismatch (expected {shard.get('md5sum')}, got {digest}); the shard is corrupt"
            )
    return data


def _load_shard(
    cache_dir: Path, shard: dict, wanted: set[str] | None, verify: bool
) -> dict[str, np.ndarray]:
    """The arrays of one shard (only the ``wanted`` ones, when given)."""
    path = cache_dir / shard["dataPath"]
    if shard.get("format") != "raw-shard":
        raise UserError(f"{path}: shard format {shard.get('format')!r} is not 'raw-shard'")
    records = [r for r in shard["records"] if wanted is None or r["name"] in wanted]
    if not records:
        return {}
    data = _read_shard(path, shard, verify)
    arrays = {}
    for rec in records:
        where = f"{path}: tensor '{rec['name']}'"
        dtype = _cache_dtype(rec["dtype"], where)
        offset, nbytes, shape = rec["byteOffset"], rec["nbytes"], tuple(rec["shape"])
        if offset + nbytes > len(data):
            raise UserError(
                f"{where} ends at byte {offset + nbytes}, past the shard's end ({len(data)})"
            )
        fmt = rec.get("format", "raw")
        if fmt == "f32-to-bf16" and dtype == np.float32:
            stored = np.dtype(ml_dtypes.bfloat16)
        elif fmt == "raw":
            stored = dtype
        else:
            raise UserError(f"{where}: unsupported record format {fmt!r}")
        if nbytes != math.prod(shape) * stored.itemsize:
            raise UserError(f"{where}: {nbytes} bytes do not hold {rec['dtype']} {shape}")
        array = np.frombuffer(data, stored, math.prod(shape), offset).reshape(shape)
        arrays[rec["name"]] = array.astype(dtype) if stored != dtype else array
    return arrays


def load_tensor_cache(
    cache_dir: str | Path,
    names_in_order: list[str] | None = None,
    verify: bool = True,
) -> list[np.ndarray] | dict[str, np.ndarray]:
    """Read a tensor cache written by :func:`convert_checkpoint` (or by
    ``tvmjs.dump_tensor_cache``, including its ``f32-to-bf16`` encoding).

    Shards are read one at a time; each is checked against the size recorded
    in ``tensor-cache.json`` and, if ``verify``, its md5.  Returns a dict by
    name, or with ``names_in_order`` a list in that order (shards holding none
    of those names are not read).  The arrays of one shard share its buffer.
    """
    cache_dir = Path(cache_dir)
    cache_file = cache_dir / CACHE_FILE
    try:
        shards = json.loads(cache_file.read_text())["records"]
    except FileNotFoundError:
        raise UserError(f"{cache_dir}: no {CACHE_FILE} (not a tensor cache)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{cache_file}: not a valid tensor cache index ({e})") from None
    wanted = None if names_in_order is None else set(names_in_order)

    arrays: dict[str, np.ndarray] = {}
    for shard in shards:
        try:
            arrays.update(_load_shard(cache_dir, shard, wanted, verify))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{cache_file}: malformed shard record ({e!r})") from None

    if names_in_order is None:
        return arrays
    absent = [n for n in names_in_order if n not in arrays]
    if absent:
        raise UserError(f"{cache_dir}: tensor cache lacks {_some(absent)}")
    return [arrays[n] for n in names_in_order]
