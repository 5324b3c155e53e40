"""The emulated side of a parity job: ``python -m
qwen35_mobile.parity.emulators.worker ARTIFACT JOB.json OUT.npz``.

Runs inside the emulator (e.g. the aarch64 Python under qemu, see
``aarch64.py``); needs numpy and TVM only, no tokenizer and no transformers.
JOB.json: ``{"prompts": [[token ids], ...], "new_tokens": N, "images": NPZ or absent,
"image_cases": [...] (parity.report.image_prompts) or absent}``: loads ARTIFACT
with the project's :class:`~..engine.Engine`, runs
:func:`..parity.collect_ours` and saves its arrays to OUT.npz.  Or
``{"replay": CALLS.npz}``: runs every captured kernel call of CALLS.npz
(:func:`.capture.save_calls`) with ARTIFACT's library and saves what the
kernels wrote (:func:`.capture.run_calls`); with ``"override": {"library":
LIB.so, "kernels": [names]}`` those kernels come from LIB.so (``--break-kernel``).  Progress goes
to stderr; the last line of stdout is a JSON object of timings.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    artifact, job_path, out_path = argv
    job = json.loads(Path(job_path).read_text())

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.time()
    import numpy as np
    import tvm  # noqa: F401  (timed on its own: the biggest cost of starting under an emulator)

    t1 = time.time()
    from ...bindings.engine import Engine
    from ...errors import UserError
    from ..report import collect_ours

    if "replay" in job:
        from ...compile.artifact import read_manifest
        from .capture import load_calls, run_calls, save_calls

        library = Path(artifact) / read_manifest(Path(artifact))["library"]
        override = job.get("override") or {}
        calls = run_calls(
            library,
            load_calls(Path(job["replay"])),
            progress,
            override=Path(override["library"]) if override else None,
            override_kernels=override.get("kernels", []),
        )
        t3 = time.time()
        save_calls(calls, Path(out_path), with_after=True)
        print(
            json.dumps(
                {
                    "machine": platform.machine(),
                    "import_s": round(t1 - t0, 2),
                    "run_s": round(t3 - t1, 2),
                }
            )
        )
        return 0
    try:
        engine = Engine(Path(artifact))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    t2 = time.time()
    progress(
        f"worker ({platform.machine()}): tvm imported in {t1 - t0:.1f} s, {artifact} loaded in {t2 - t1:.1f} s"
    )
    images = None
    if job.get("images"):
        with np.load(job["images"]) as data:
            images = [data[f"arr_{i}"] for i in range(len(data.files))]
    arrays = collect_ours(
        engine,
        [list(p) for p in job["prompts"]],
        int(job["new_tokens"]),
        progress,
        images,
        job.get("image_cases"),
    )
    t3 = time.time()
    np.savez(out_path, **arrays)
    print(
        json.dumps(
            {
                "machine": platform.machine(),
                "import_s": round(t1 - t0, 2),
                "load_s": round(t2 - t1, 2),
                "run_s": round(t3 - t2, 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
