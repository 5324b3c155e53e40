"""The input contract of each kernel, checked once for all its backends.

Every backend of a kernel (the CPU kernel, the GPU kernels, the GPU kernels
emulated on the CPU) starts by calling its checker here, which validates the
``nn.Tensor`` arguments (static ranks, head counts and sizes, dtypes) and
returns the static sizes the kernel is built for.  Symbolic sizes (batch,
sequence length) are the kernels' own ``T.int64()`` variables and are not
compared here.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.relax.frontend.nn import Tensor, op

__all__ = ["ConvDims", "GdnDims", "conv_dims", "gdn_dims"]

F32 = "float32"


def _static(tensor: Tensor, axes: range, label: str) -> tuple[int, ...]:
    dims = []
    for axis in axes:
        dim = tensor.shape[axis]
        if not isinstance(dim, int):
            raise ValueError(f"{label} axis {axis} must be static, got {dim}")
        dims.append(dim)
    return tuple(dims)


def _rank(tensor: Tensor, rank: int, label: str, layout: str) -> None:
    if len(tensor.shape) != rank:
        raise ValueError(f"{label} must be {layout}, got shape {list(tensor.shape)}")


@dataclass(frozen=True)
class GdnDims:
    """Static sizes of a gated delta rule call."""

    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    dtype: str  # of q, k and v (the model dtype)


def gdn_dims(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor) -> GdnDims:
    """Check the inputs of the gated delta rule and return their static sizes.

    q, k ``[B, T, Hk, Dk]`` and v ``[B, T, Hv, Dv]`` in one dtype, ``Hv`` a
    multiple of ``Hk``; g, beta ``[B, T, Hv]`` and state ``[B, Hv, Dk, Dv]`` float32.
    """
    _rank(q, 4, "q", "[B, T, Hk, Dk]")
    _rank(k, 4, "k", "[B, T, Hk, Dk]")
    _rank(v, 4, "v", "[B, T, Hv, Dv]")
    _rank(g, 3, "g", "[B, T, Hv]")
    _rank(beta, 3, "beta", "[B, T, Hv]")
    _rank(state, 4, "state", "[B, Hv, Dk, Dv]")
    hk, dk = _static(q, range(2, 4), "q")
    hv, dv = _static(v, range(2, 4), "v")
    if _static(k, range(2, 4), "k") != (hk, dk):
        raise ValueError(f"k heads and head dim {list(k.shape[2:])} differ from q's {[hk, dk]}")
    if hv % hk:
        raise ValueError(f"num_v_heads {hv} is not a multiple of num_k_heads {hk}")
    for tensor, label in ((g, "g"), (beta, "beta")):
        if _static(tensor, range(2, 3), label) != (hv,):
            raise ValueError(f"{label} must have {hv} heads (v's), got {tensor.shape[2]}")
    if _static(state, range(1, 4), "state") != (hv, dk, dv):
        raise ValueError(f"state must be [B, {hv}, {dk}, {dv}], got {list(state.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    for tensor, label in ((g, "g"), (beta, "beta"), (state, "state")):
        if tensor.dtype != F32:
            raise ValueError(f"{label} must be float32, got {tensor.dtype}")
    return GdnDims(hk, hv, dk, dv, q.dtype)


@dataclass(frozen=True)
class ConvDims:
    """Static sizes of a causal conv call, and its weight as ``[C, K]``."""

    channels: int
    kernel_size: int
    weight: Tensor  # [C, K]


def conv_dims(x: Tensor, conv_state: Tensor, weight: Tensor) -> ConvDims:
    """Check the inputs of the causal conv and return their static sizes.

    x ``[B, T, C]`` and conv_state ``[B, C, K - 1]`` in one dtype; weight
    ``[C, K]`` or Hugging Face's ``conv1d.weight`` ``[C, 1, K]`` (reshaped to
    ``[C, K]`` here), any float dtype.
    """
    if len(weight.shape) == 3:
        if _static(weight, range(1, 2), "weight") != (1,):
            raise ValueError(f"a 3-d weight must be [C, 1, K], got {list(weight.shape)}")
        weight = op.reshape(weight, (weight.shape[0], weight.shape[2]))
    _rank(weight, 2, "weight", "[C, K] or [C, 1, K]")
    _rank(x, 3, "x", "[B, T, C]")
    _rank(conv_state, 3, "conv_state", "[B, C, K - 1]")
    channels, kernel_size = _static(weight, range(2), "weight")
    if kernel_size < 2:
        raise ValueError(f"kernel_size must be at least 2, got {kernel_size}")
    if _static(x, range(2, 3), "x") != (channels,):
        raise ValueError(f"x has {x.shape[2]} channels, the weight {channels}")
    if _static(conv_state, range(1, 3), "conv_state") != (channels, kernel_size - 1):
        raise ValueError(
            f"conv_state must be [B, {channels}, {kernel_size - 1}], got {list(conv_state.shape)}"
        )
    if conv_state.dtype != x.dtype:
        raise ValueError(f"conv_state dtype {conv_state.dtype} differs from x dtype {x.dtype}")
    return ConvDims(channels, kernel_size, weight)
