"""Shared by the CPU and GPU DeltaNet kernel tests: inputs shaped as the layer
produces them, and transformers' reference functions."""

from __future__ import annotations

import numpy as np
from conftest import need_module  # noqa: E402  (tests/ is on sys.path, as for this module)

hf = need_module("transformers.models.qwen3_5.modeling_qwen3_5")
torch = need_module("torch")


def gdn_inputs(
    b: int, t: int, hk: int, hv: int, dk: int, dv: int, seed: int
) -> dict[str, np.ndarray]:
    """Unit-norm q, k; g < 0; beta in (0, 1); a random starting state."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, hk, dk)).astype(np.float32)
    k = rng.standard_normal((b, t, hk, dk)).astype(np.float32)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    return {
        "q": q,
        "k": k,
        "v": rng.standard_normal((b, t, hv, dv)).astype(np.float32),
        "g": -rng.uniform(0.01, 3.0, (b, t, hv)).astype(np.float32),
        "beta": rng.uniform(0.05, 0.95, (b, t, hv)).astype(np.float32),
        "state": (0.3 * rng.standard_normal((b, hv, dk, dv))).astype(np.float32),
    }


def gdn_reference(
    x: dict[str, np.ndarray], dtype: str, chunked: bool
) -> tuple[np.ndarray, np.ndarray]:
    """transformers' reference; it scales q by Dk**-0.5 itself."""
    q, k, v = (torch.from_numpy(x[n]).to(getattr(torch, dtype)) for n in ("q", "k", "v"))
    g, beta, state = (torch.from_numpy(x[n]) for n in ("g", "beta", "state"))
    fn = hf.torch_chunk_gated_delta_rule if chunked else hf.torch_recurrent_gated_delta_rule
    o, new_state = fn(q, k, v, g, beta, initial_state=state, output_final_state=True)
    return o.float().numpy(), new_state.numpy()


def conv_inputs(b: int, t: int, channels: int, kernel: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, t, channels)).astype(np.float32)
    state = rng.standard_normal((b, channels, kernel - 1)).astype(np.float32)
    weight = (0.5 * rng.standard_normal((channels, kernel))).astype(np.float32)
    return x, state, weight


def assert_close(actual: np.ndarray, expected: np.ndarray, tol: float) -> None:
    """Elementwise |actual - expected| <= tol * max|expected|."""
    expected = np.asarray(expected, dtype=np.float32)
    actual = np.asarray(actual, dtype=np.float32)
    assert actual.shape == expected.shape
    scale = max(float(np.abs(expected).max()), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale)
