"""Hand-scheduled TIR kernels for the Gated DeltaNet layers and the vision
tower's attention, exposed as
``tvm.relax.frontend.nn`` functions (symbolic batch and sequence length).

The model does not choose its kernels: it is given a :class:`KernelSet`, one
function per kernel it calls, made by :func:`kernel_set_for` from the target
preset.  There are three: the CPU kernels (:func:`cpu_kernels`), the GPU
kernels (:func:`gpu_kernels`) and the GPU kernels emulated with serial loops
on the CPU for the host twins (:func:`gpu_emulated_kernels`).  Each is bound
to the target that sizes its kernels (vector blocks on the CPU, threads per
block on a GPU); no kernel reads an ambient target.  A kernel's input checks
live in :mod:`.checks`, shared by its backends.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from tvm.relax.frontend.nn import Tensor
from tvm.target import Target

from . import causal_conv as _cpu_conv
from . import gated_delta_rule as _cpu_gdn
from . import gpu_causal_conv as _gpu_conv
from . import gpu_gated_delta_rule as _gpu_gdn
from . import q8_gemv as _q8
from . import vision_attention as _vision
from .causal_conv import causal_conv1d, causal_conv1d_func
from .gated_delta_rule import block_cols_for_target, gated_delta_rule, gated_delta_rule_func

if TYPE_CHECKING:
    from ...targets import TargetPreset

__all__ = [
    "CPU",
    "GPU",
    "GPU_EMULATED",
    "KernelSet",
    "block_cols_for_target",
    "causal_conv1d",
    "causal_conv1d_func",
    "cpu_kernels",
    "gated_delta_rule",
    "gated_delta_rule_func",
    "gpu_emulated_kernels",
    "gpu_kernels",
    "kernel_set_for",
]

# KernelSet.backend
CPU = "cpu"  # llvm: parallel + vectorised, recurrent gated delta rule
GPU = "gpu"  # thread-bound: recurrent decode, chunked prefill (run-time switch)
GPU_EMULATED = "gpu-emulated"  # the GPU kernels' very bodies with serial loops, for llvm


class GatedDeltaRule(Protocol):
    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor
    ) -> tuple[Tensor, Tensor]:
        """q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv] fp32; state
        [B, Hv, Dk, Dv] fp32 -> (o [B, T, Hv, Dv] fp32, new state)."""


class VisionAttention(Protocol):
    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v [n, heads, hd] fp32 -> softmax(q k^T / sqrt(hd)) v [n, heads, hd]
        over all n patches of one image (the vision tower, non-causal)."""


class CausalConv1d(Protocol):
    def __call__(self, x: Tensor, conv_state: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, C]; conv_state [B, C, K - 1]; weight [C, K]
        -> (silu(conv(x)) [B, T, C], new state)."""


class Q4Q8Gemv(Protocol):
    def __call__(
        self,
        x: Tensor,
        weight: Tensor,
        scale: Tensor,
        n: int,
        k: int,
        *,
        out_dtype: str = "float32",
        residual: Tensor | None = None,
        up: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor | None:
        """x [m, 1, k] @ dequant(W [n, k])^T with int8 activations -> [m, 1, n] in
        ``out_dtype``; ``residual + ...`` (fp32) or SwiGLU with the ``up`` projection's
        (weight, scale); None where the kernel does not apply to this shape (the caller
        keeps the fp32 GEMV)."""


@dataclass(frozen=True)
class KernelSet:
    """The hand-written kernels a model is exported with, one function per
    kernel the model calls, bound to the target that sizes them."""

    backend: str  # CPU, GPU or GPU_EMULATED
    target: Target  # the target the kernels are sized for (for GPU_EMULATED: the GPU's)
    gated_delta_rule: GatedDeltaRule
    causal_conv1d: CausalConv1d
    vision_attention: VisionAttention
    # The decode GEMV with int8 activations (q4f16_i8), on CPUs that have one, else None.
    q4_q8_gemv: Q4Q8Gemv | None = None

    def __repr__(self) -> str:
        return f"KernelSet({self.backend}, {self.target})"


def cpu_kernels(target: Target) -> KernelSet:
    """The CPU kernels, column blocks sized for the llvm ``target``'s vector registers."""
    return KernelSet(
        CPU,
        target,
        gated_delta_rule=functools.partial(_cpu_gdn.gated_delta_rule, target=target),
        causal_conv1d=_cpu_conv.causal_conv1d,
        vision_attention=_vision.attention,
        q4_q8_gemv=functools.partial(_q8.gemv, target=target) if _q8.isa_of(target) else None,
    )


def gpu_kernels(target: Target) -> KernelSet:
    """The GPU kernels, at most ``min(256, max_num_threads)`` threads per block of ``target``."""
    return KernelSet(
        GPU,
        target,
        gated_delta_rule=functools.partial(_gpu_gdn.gated_delta_rule, target=target),
        causal_conv1d=functools.partial(_gpu_conv.causal_conv1d, target=target),
        vision_attention=functools.partial(_vision.gpu_attention, target=target),
    )


def gpu_emulated_kernels(gpu_target: Target) -> KernelSet:
    """The GPU kernels of ``gpu_target`` (same sizes, names and arguments) with
    serial loops instead of thread bindings, compilable for ``llvm``: the host twin's."""
    return KernelSet(
        GPU_EMULATED,
        gpu_target,
        gated_delta_rule=functools.partial(
            _gpu_gdn.gated_delta_rule, target=gpu_target, emulate=True
        ),
        causal_conv1d=functools.partial(_gpu_conv.causal_conv1d, target=gpu_target, emulate=True),
        vision_attention=functools.partial(_vision.gpu_attention, target=gpu_target, emulate=True),
    )


def kernel_set_for(preset: TargetPreset, dtype: str | None = None) -> KernelSet:
    """The kernels of ``preset``'s build: the one place where a preset picks them.

    A host twin (``graph_of``) gets its GPU preset's kernels emulated on the
    CPU; a GPU preset the GPU kernels of its kernel target (``kernels_of``'s for
    an emulation preset); a CPU preset the CPU kernels of its target."""
    from ...targets import get_target

    if preset.graph_of:
        return gpu_emulated_kernels(get_target(preset.graph_of).tvm_target(dtype))
    target = preset.kernel_target(dtype)
    return gpu_kernels(target) if preset.is_gpu else cpu_kernels(target)
