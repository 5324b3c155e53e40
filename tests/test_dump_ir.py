"""``compile --dump-ir DIR`` writes the IR after each pipeline stage."""

from __future__ import annotations

from qwen35_mobile.cli import main


def test_dump_ir_writes_every_stage_in_order(tmp_path, checkpoint):
    dump = tmp_path / "ir"
    assert (
        main(
            [
                "compile",
                "--model",
                str(checkpoint("tiny")),
                "--target",
                "host",
                "--quant",
                "q0f32",
                "-o",
                str(tmp_path / "out"),
                "--dump-ir",
                str(dump),
            ]
        )
        == 0
    )
    files = sorted(p.name for p in dump.iterdir())
    assert files[0] == "000-export.py"
    numbers = [int(name.split("-", 1)[0]) for name in files]
    assert numbers == list(range(len(files))), files  # numbered in the order they ran
    assert len(files) > 5, files
    assert "@R.function" in (dump / "000-export.py").read_text()
    # the CPU schedules' stage and TIR lowering are there, and the last one is scheduled TIR
    assert any("LowerTVMBuiltin" in n for n in files), files
    assert "@T.prim_func" in (dump / files[-1]).read_text()
