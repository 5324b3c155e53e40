"""Hand-scheduled TIR kernels for the Gated DeltaNet layers, exposed as
``tvm.relax.frontend.nn`` functions (symbolic batch and sequence length)."""

from .causal_conv import causal_conv1d, causal_conv1d_func
from .gated_delta_rule import block_cols_for_target, gated_delta_rule, gated_delta_rule_func

__all__ = [
    "block_cols_for_target",
    "causal_conv1d",
    "causal_conv1d_func",
    "gated_delta_rule",
    "gated_delta_rule_func",
]
