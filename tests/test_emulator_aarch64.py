"""The tiny model compiled for the ``aarch64`` preset (NEON; +fullfp16 in fp16
builds), cross-linked with aarch64-linux-gnu-g++, runs under qemu-user in
Debian's arm64 Python through the project's Engine (parity/emulators), and
its logits match transformers' and the host build's.

Sets the emulator up with scripts/setup_emulators.d/aarch64.sh when needed;
skips (with the reason) only when that cannot be done here, and fails instead
under CI=true (tests/conftest.py: need)."""

from __future__ import annotations

import platform
import shutil
import subprocess

import numpy as np
import pytest
from conftest import need

from qwen35_mobile.errors import UserError
from qwen35_mobile.parity.emulators import aarch64
from qwen35_mobile.parity.report import CRITERIA, QUANT_CRITERIA

NEW_TOKENS = 16
LENGTHS = (10, 150)  # the second longer than the reference's 64-token DeltaNet chunk


@pytest.fixture(scope="module")
def emulator():
    need(aarch64.setup(), "the aarch64 emulator (qemu-user + the arm64 sysroot)")
    return aarch64


@pytest.fixture(scope="module")
def prompts(emulator):
    from qwen35_mobile.compile.config import preset

    rng = np.random.default_rng(7)
    vocab = preset("tiny").vocab_size
    return [rng.integers(0, vocab, n).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def aarch64_build(emulator, checkpoint, tmp_path_factory):
    """quant -> aarch64 artifact of the tiny checkpoint (built once per module)."""
    from qwen35_mobile.compile.compiler import compile_model

    root = tmp_path_factory.mktemp("aarch64-emulated")
    made = {}

    def make(quant: str):
        if quant not in made:
            out = root / f"tiny-aarch64-{quant}"
            compile_model(
                "tiny",
                "aarch64",
                quant,
                out,
                weights=str(checkpoint("tiny")),
                progress=lambda _: None,
            )
            made[quant] = out
        return made[quant]

    return make


@pytest.fixture(scope="module")
def emulated(aarch64_build, prompts):
    """quant -> (collect_ours arrays computed under qemu, worker timings)."""
    done = {}

    def run(quant: str):
        if quant not in done:
            done[quant] = aarch64.run_job(aarch64_build(quant), prompts, NEW_TOKENS, timeout=1200)
        return done[quant]

    return run


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours.astype(np.float64) - ref).max() / np.abs(ref).max())


def _reference(checkpoint, artifact):
    from qwen35_mobile.compile.artifact import read_manifest
    from qwen35_mobile.parity.reference import Reference

    manifest = read_manifest(artifact)
    dtypes = {p["name"]: p["dtype"] for p in manifest["parameters"]}
    return Reference(checkpoint("tiny"), round_to=dtypes, quant=manifest["quantization"])


# q0f16 (NEON + fullfp16 arithmetic) and q4f16_i8 (the int8 decode GEMV on sdot, with its
# own criteria): the q0f32 build's whole model runs under qemu against transformers in
# tests/test_emulators.py (test_aarch64_whole_model_...).
@pytest.mark.parametrize("quant", ["q0f16", "q4f16_i8"])
def test_emulated_logits_match_transformers(quant, emulated, aarch64_build, checkpoint, prompts):
    got, info = emulated(quant)
    assert (
        info["machine"] == "aarch64"
    )  # the worker ran on the emulated CPU (the contract accepted the library)
    criteria = QUANT_CRITERIA.get(quant, CRITERIA["float16"])
    ref = _reference(checkpoint, aarch64_build(quant))
    worst, agree = 0.0, []
    for i, ids in enumerate(prompts):
        ref_logits, _ = ref.logits(ids)
        ours = got[f"p{i}.prefill"]
        assert ours.shape == ref_logits.shape
        worst = max(worst, _rel(ours, ref_logits))
        agree.extend(ours.argmax(-1) == ref_logits.argmax(-1))
        split = len(ids) // 2
        worst = max(worst, _rel(got[f"p{i}.continued"], ref_logits[split:]))
        ref_tokens, ref_rows = ref.greedy(ids, NEW_TOKENS)
        tokens = got[f"p{i}.greedy_tokens"].tolist()
        if criteria["greedy_identical"]:
            assert tokens == ref_tokens, f"prompt {i}: greedy tokens differ"
            worst = max(worst, _rel(got[f"p{i}.greedy_logits"], ref_rows))
        else:  # compare while both sides have seen the same tokens
            n = next(
                (k + 1 for k, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), NEW_TOKENS
            )
            worst = max(worst, _rel(got[f"p{i}.greedy_logits"][:n], ref_rows[:n]))
    print(
        f"aarch64 {quant} under qemu vs transformers: max_rel {worst:.3g}, top-1 {np.mean(agree):.3f}, worker {info}"
    )
    assert worst <= criteria["max_rel"]
    assert np.mean(agree) >= criteria["min_top1"]


@pytest.mark.parametrize("quant", ["q0f16"])
def test_emulated_matches_host_build(quant, emulated, artifact, prompts):
    from qwen35_mobile.bindings.engine import Engine
    from qwen35_mobile.parity.report import collect_ours

    got, _ = emulated(quant)
    host = collect_ours(Engine(artifact("tiny", quant)), prompts, NEW_TOKENS)
    assert set(got) == set(host)
    for i in range(len(prompts)):
        assert _rel(got[f"p{i}.prefill"], host[f"p{i}.prefill"]) <= CRITERIA["float16"]["max_rel"]


def _fp16_arith(library) -> list[str]:
    """The half-precision arithmetic instructions in an aarch64 library:
    scalar (``fadd h0, ...``) or vector (``fmla v0.8h, ...``)."""
    import re

    dump = subprocess.run(
        ["aarch64-linux-gnu-objdump", "-d", "--no-show-raw-insn", str(library)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pattern = re.compile(
        r"\s(f(?:add|sub|mul|mla|mls|div|max|min|neg|abs|sqrt)\w*)\s+(?:h\d+|v\d+\.[48]h)\b"
    )
    return [m.group(1) for m in pattern.finditer(dump)]


def test_fp16_build_uses_half_precision_arithmetic(aarch64_build):
    from qwen35_mobile.compile.artifact import read_manifest

    need(
        shutil.which("aarch64-linux-gnu-objdump") is None
        and "no aarch64-linux-gnu-objdump (Debian: binutils-aarch64-linux-gnu)",
        "the aarch64 cross binutils",
    )

    f16, f32 = aarch64_build("q0f16"), aarch64_build("q0f32")
    assert "+fullfp16" in read_manifest(f16)["tvm_target"]["mattr"]
    assert "+fullfp16" not in read_manifest(f32)["tvm_target"]["mattr"]
    half = _fp16_arith(f16 / "model.so")
    assert len(half) >= 8, half  # FP16 adds/multiplies (ARMv8.2 fullfp16), not only conversions
    assert _fp16_arith(f32 / "model.so") == []


def _objdump(library) -> str:
    need(
        shutil.which("aarch64-linux-gnu-objdump") is None
        and "no aarch64-linux-gnu-objdump (Debian: binutils-aarch64-linux-gnu)",
        "the aarch64 cross binutils",
    )
    return subprocess.run(
        ["aarch64-linux-gnu-objdump", "-d", "--no-show-raw-insn", str(library)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_int8_build_uses_sdot(aarch64_build):
    """q4f16_i8's decode GEMVs are NEON dot products (+dotprod in the preset's fp16 features):
    sdot in its library, none in the q0f16 one (the negative control of the count)."""
    import re

    sdot = re.compile(r"\ssdot\s+v\d+\.4s")
    assert len(sdot.findall(_objdump(aarch64_build("q4f16_i8") / "model.so"))) >= 16
    assert sdot.findall(_objdump(aarch64_build("q0f16") / "model.so")) == []


def test_host_refuses_the_aarch64_library(aarch64_build):
    from qwen35_mobile.bindings.contract import check_contract

    if (
        platform.machine() == "aarch64"
    ):  # not a missing tool: the one skip CI allows (tests/conftest.py)
        pytest.skip("this machine is aarch64: it runs the library natively")
    with pytest.raises(UserError, match="aarch64"):
        check_contract(aarch64_build("q0f32"))


def test_failure_raises_with_the_tail_of_stderr(emulator):
    with pytest.raises(
        UserError, match="JOB.json"
    ):  # the worker's usage, printed before importing TVM
        aarch64.run_in_qemu(aarch64.WORKER, [], timeout=120)
