"""Byte-identical rebuilds: the same inputs make the same library bytes.

Two causes of difference between builds, both fixed here:

* TVM's ``VMShapeLower`` writes the symbolic-shape computations of each
  ``shape_func`` in the iteration order of a hash map keyed by object
  addresses, which changes from one process to the next.  The stores are
  independent (each computes one slot of the shape heap from slots already
  known), so :func:`canonical_shape_funcs` sorts every run of independent
  stores by slot; the LLVM code of the library is then the same every time.
* TVM's ``tar`` packs the objects of a static library with ``tar -czf``,
  which records the files' mtimes, owners and the gzip timestamp.
  :func:`deterministic_tar` writes the same gzip'd tar with none of those.
"""

from __future__ import annotations

import gzip
import os
import re
import tarfile


def _loads(expr, heap, found: set[int]) -> bool:
    """Collect the constant index of every load of ``heap`` in ``expr``.
    False when the expression holds anything else this walker does not know
    (a load of another buffer, a non-constant index, an unknown node): the
    caller then leaves the statement where it is."""
    import tvm
    from tvm import tirx
    from tvm.ir.prim import expr as prim

    if isinstance(expr, tvm.ir.TensorLoad):
        if (
            not expr.source.same_as(heap)
            or len(expr.indices) != 1
            or not isinstance(expr.indices[0], tirx.IntImm)
        ):
            return False
        found.add(int(expr.indices[0].value))
        return True
    if isinstance(expr, (tirx.IntImm, prim.FloatImm, tvm.ir.StringImm)):
        return True
    if isinstance(expr, (prim.BinaryOpExpr, prim.CmpExpr, prim.And, prim.Or)):
        return _loads(expr.a, heap, found) and _loads(expr.b, heap, found)
    if isinstance(expr, prim.Not):
        return _loads(expr.a, heap, found)
    if isinstance(expr, prim.Cast):
        return _loads(expr.value, heap, found)
    if isinstance(expr, prim.Select):
        return all(
            _loads(e, heap, found) for e in (expr.condition, expr.true_value, expr.false_value)
        )
    if isinstance(expr, tvm.ir.Var):  # a symbolic variable (not a buffer: loads are TensorLoads)
        return True
    return False


def _store_key(stmt):
    """(heap buffer, slot written, slots read) of a shape-heap store, or None
    if ``stmt`` is anything else."""
    from tvm import tirx

    if not isinstance(stmt, tirx.BufferStore) or len(stmt.indices) != 1:
        return None
    if not isinstance(stmt.indices[0], tirx.IntImm):
        return None
    reads: set[int] = set()
    if not _loads(stmt.value, stmt.buffer, reads):
        return None
    return stmt.buffer, int(stmt.indices[0].value), reads


def _sorted_seq(stmts: list) -> list:
    """Sort each maximal run of independent shape-heap stores by slot."""
    out: list = []
    run: list = []  # (slot, stmt)
    heap = None
    written: set[int] = set()
    read: set[int] = set()

    def flush():
        out.extend(stmt for _, stmt in sorted(run, key=lambda kv: kv[0]))
        run.clear()
        written.clear()
        read.clear()

    for stmt in stmts:
        key = _store_key(stmt)
        if key is None:
            flush()
            out.append(stmt)
            continue
        buffer, slot, reads = key
        # a store that depends on the run (or writes another buffer) starts a new one
        if (
            heap is None
            or not buffer.same_as(heap)
            or slot in written
            or slot in read
            or reads & written
        ):
            flush()
            heap = buffer
        run.append((slot, stmt))
        written.add(slot)
        read.update(reads)
    flush()
    return out


def canonical_shape_funcs():
    """A module pass: the statements of every ``[prefix]shape_func*`` PrimFunc that
    ``VMShapeLower`` emitted in hash-map order, in slot order."""
    import tvm
    from tvm import tirx

    @tvm.ir.transform.module_pass(opt_level=0, name="CanonicalShapeFuncs")
    def transform(mod, _ctx):
        updates = {}
        for gvar, func in mod.functions.items():
            # "shape_func3", or "qwen35_0_8b_q4f16_1_shape_func3" in a system library with a prefix
            if not isinstance(func, tirx.PrimFunc) or not re.search(
                r"(^|_)shape_func\d*$", gvar.name_hint
            ):
                continue
            body = func.body
            if isinstance(body, tirx.SeqStmt):
                seq = list(body.seq)
                new = _sorted_seq(seq)
                if any(not a.same_as(b) for a, b in zip(seq, new)):
                    updates[gvar] = func.with_body(tirx.SeqStmt(new))
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return transform


def deterministic_tar(output: str, files: list[str]) -> None:
    """``fcompile`` for ``export_library``: the files (by base name, sorted)
    in a gzip'd tar, as TVM's ``tar.tar`` makes, but with mtime 0, owner
    0/0 and no owner names, mode 0644, and no timestamp or file name in the
    gzip header, so that the same objects give the same bytes."""
    names: dict[str, str] = {}
    for path in files:
        base = os.path.basename(path)
        if base in names:
            raise ValueError(f"duplicate file name {base}")
        names[base] = path
    with (
        open(output, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
    ):
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for base in sorted(names):
                info = tarfile.TarInfo(base)
                info.size = os.path.getsize(names[base])
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(names[base], "rb") as f:
                    tar.addfile(info, f)


deterministic_tar.output_format = "tar"
