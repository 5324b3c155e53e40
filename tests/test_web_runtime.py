"""TVM's web runtime built from the apache-tvm wheel (bindings/web_runtime): the
headers we write for it behave as the runtime expects.

* builtin_fp16.h's conversions against numpy on every half value and on float32
  values around every rounding boundary (compiled natively with g++: the same
  header the wasm build compiles);
* the builder's stamp: what it was built from, so the set-up rebuilds exactly
  when the wheel, emcc or our sources change;
* the serializer reads what the wheel's compiler writes: the whole-model runs
  (tests/test_web_model.py) load a real VM executable and WebGPU module through it.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from conftest import need

from qwen35_mobile.bindings import web_runtime

FP16_PROGRAM = r"""
#include <builtin_fp16.h>
#include <cstdio>
#include <cstdint>
#include <cstring>
int main() {
  // half -> float for every half; float -> half for the floats on stdin
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = __extendXfYf2__<uint16_t, uint16_t, 10, float, uint32_t, 23>(uint16_t(h));
    uint32_t bits; std::memcpy(&bits, &f, 4); std::printf("%u\n", bits);
  }
  uint32_t bits;
  while (std::scanf("%u", &bits) == 1) {
    float f; std::memcpy(&f, &bits, 4);
    std::printf("%u\n", unsigned(__truncXfYf2__<float, uint32_t, 23, uint16_t, uint16_t, 10>(f)));
  }
}
"""


def test_fp16_conversions_match_numpy(tmp_path):
    gxx = shutil.which("g++")
    need(None if gxx else "g++ not found", "g++")
    src, exe = tmp_path / "fp16.cc", tmp_path / "fp16"
    src.write_text(FP16_PROGRAM)
    include = web_runtime.SOURCES / "3rdparty" / "compiler-rt"
    subprocess.run([gxx, "-O1", "-std=c++17", f"-I{include}", str(src), "-o", str(exe)], check=True)
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    # floats: every half widened, the midpoints between neighbours (ties), a step on
    # either side of each, overflow, subnormal and NaN edges, random values
    widened = halves.view(np.float16).astype(np.float32)
    finite = np.sort(widened[np.isfinite(widened)])
    mid = ((finite[:-1].astype(np.float64) + finite[1:]) / 2).astype(np.float32)
    around = np.concatenate(
        [mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf))]
    )
    rng = np.random.default_rng(0)
    edges = np.array([65504, 65519.99, 65520, 1e5, 3e38, 6e-8, 2.9e-8, 3e-8, 1e-10], np.float32)
    floats = np.concatenate(
        [widened, around, edges, -edges, rng.standard_normal(20000).astype(np.float32) * 100]
    ).astype(np.float32)
    stdin = "\n".join(str(b) for b in floats.view(np.uint32)) + "\n"
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True)
    values = np.array(out.stdout.split(), dtype=np.uint64)
    ours_f32 = values[:65536].astype(np.uint32).view(np.float32)
    ours_f16 = values[65536:].astype(np.uint16)
    assert len(ours_f16) == len(floats)
    ref_f32 = halves.view(np.float16).astype(np.float32)
    nan = np.isnan(ref_f32)
    assert np.array_equal(np.isnan(ours_f32), nan)
    assert np.array_equal(ours_f32[~nan].view(np.uint32), ref_f32[~nan].view(np.uint32))
    with np.errstate(over="ignore"):
        ref_f16 = floats.astype(np.float16)
    nan = np.isnan(ref_f16)
    assert np.array_equal(np.isnan(ours_f16.view(np.float16)), nan)
    bad = np.nonzero(ours_f16[~nan] != ref_f16[~nan].view(np.uint16))[0]
    assert len(bad) == 0, [(float(floats[~nan][i]), ours_f16[~nan][i]) for i in bad[:5]]


def test_fp16_check_can_fail(tmp_path, monkeypatch):
    """Negative control: truncation instead of rounding is caught."""
    broken = tmp_path / "broken"
    (broken / "3rdparty" / "compiler-rt").mkdir(parents=True)
    header = (web_runtime.SOURCES / "3rdparty" / "compiler-rt" / "builtin_fp16.h").read_text()
    assert "if (rem > half || (rem == half && (q & 1))) ++q;" in header
    (broken / "3rdparty" / "compiler-rt" / "builtin_fp16.h").write_text(
        header.replace("if (rem > half || (rem == half && (q & 1))) ++q;", "")
    )
    monkeypatch.setattr(web_runtime, "SOURCES", broken)
    with pytest.raises(AssertionError):
        test_fp16_conversions_match_numpy(tmp_path)


def test_build_stamp_names_what_the_runtime_came_from():
    from qwen35_mobile.bindings.web_runtime import build

    need(None if shutil.which("emcc") else "emcc not found", "emscripten")
    want = build.wanted_stamp()
    assert want["wheels"].startswith("apache-tvm 0.27") and "tvm-ffi" in want["wheels"]
    assert "emcc" in want["emcc"] and len(want["sources"]) == 16
    built = web_runtime.stamp()
    need(
        web_runtime.why_unavailable(), "TVM's web runtime (scripts/setup_emulators.sh web-runtime)"
    )
    # the set-up built it from exactly these inputs (else it would rebuild)
    assert built == want
    objects = web_runtime.runtime_objects()
    assert [p.name for p in objects] == [f"{p}.o" for p in web_runtime.PARTS]
    assert all(p.read_bytes()[:4] == b"\0asm" for p in objects)
    assert "tvmjs" in web_runtime.tvmjs_bundle().read_text()[:20000]
