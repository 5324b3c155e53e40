"""An ``nn`` wrapper for TVM's recurrent-state object (``vm.builtin.rnn_state_*``).

The runtime keeps, per layer and per state id, a storage of shape
``[reserved_seqs, max_history, size]`` and calls our ``get``/``set`` kernels
with the slot ids of the sequences in the current batch.  Every state here is
flat (1-D ``size``); the model reshapes it (the conv state to
``[conv_dim, K-1]``, the DeltaNet state to ``[Hv, Dk, Dv]``).

Sequences are added, removed, forked and rolled back through the generic
``vm.builtin.kv_state_*`` functions, exactly like the paged KV cache, so the
bindings drive both caches with the same calls.
"""

from __future__ import annotations

from tvm import relax as rx
from tvm import tirx
from tvm.relax.frontend.nn import Object, Tensor
from tvm.script import tirx as T


def _get_func(size: int, dtype: str):
    """out[b, :] = storage[seq_slot[b], history_slot[b], :]"""

    @T.prim_func(private=True, s_tir=True)
    def rnn_state_get(
        var_storage: T.handle, var_seq: T.handle, var_hist: T.handle, var_out: T.handle
    ):
        T.func_attr({"tirx.noalias": True})
        num_seqs, max_history, batch = T.int64(), T.int64(), T.int64()
        storage = T.match_buffer(var_storage, (num_seqs, max_history, size), dtype)
        seq_slot = T.match_buffer(var_seq, (batch,), "int32")
        hist_slot = T.match_buffer(var_hist, (batch,), "int32")
        out = T.match_buffer(var_out, (batch, size), dtype)
        for b, s in T.grid(batch, size):
            with T.sblock("copy"):
                vb, vs = T.axis.remap("SS", [b, s])
                out[vb, vs] = storage[seq_slot[vb], hist_slot[vb], vs]

    return rnn_state_get


def _set_func(size: int, dtype: str):
    """storage[seq_slot[b], (history_slot[b] + 1) % max_history, :] = data[b, :]

    The runtime passes the history slot of this round; the new state goes to
    the next one, so that a rollback (popn) can return to the old one."""

    @T.prim_func(private=True, s_tir=True)
    def rnn_state_set(
        var_storage: T.handle, var_seq: T.handle, var_hist: T.handle, var_data: T.handle
    ):
        T.func_attr({"tirx.noalias": True})
        num_seqs, max_history, batch = T.int64(), T.int64(), T.int64()
        storage = T.match_buffer(var_storage, (num_seqs, max_history, size), dtype)
        seq_slot = T.match_buffer(var_seq, (batch,), "int32")
        hist_slot = T.match_buffer(var_hist, (batch,), "int32")
        data = T.match_buffer(var_data, (batch, size), dtype)
        for b, s in T.grid(batch, size):
            with T.sblock("copy"):
                vb, vs = T.axis.remap("SS", [b, s])
                storage[
                    seq_slot[vb],
                    T.Cast("int32", T.floormod(T.Cast("int64", hist_slot[vb]) + 1, max_history)),
                    vs,
                ] = data[vb, vs]

    return rnn_state_set


class RNNState(Object):
    """Per-sequence recurrent state for the linear-attention layers."""

    @staticmethod
    def create(
        max_batch_size: tirx.Var,
        max_history: tirx.Var,
        num_layers: int,
        states: list[tuple[int, str]],
        name: str = "rnn_state",
    ) -> RNNState:
        """``states``: (flat size, dtype) of each state kept per layer."""
        bb = rx.BlockBuilder.current()
        f_gets = [
            bb.add_func(_get_func(size, dtype), f"rnn_state_get_{i}")
            for i, (size, dtype) in enumerate(states)
        ]
        f_sets = [
            bb.add_func(_set_func(size, dtype), f"rnn_state_set_{i}")
            for i, (size, dtype) in enumerate(states)
        ]
        init = [rx.op.zeros(rx.ShapeExpr([size]), dtype) for size, dtype in states]
        return RNNState(
            _expr=rx.call_pure_packed(
                "vm.builtin.rnn_state_create",
                rx.prim_value(num_layers),
                max_batch_size,
                max_history,
                rx.Tuple(f_gets),
                rx.Tuple(f_sets),
                rx.Tuple(init),
                ty_args=rx.AnyType(),
            ),
            _name=name,
        )

    def get(
        self, layer_id: int, state_id: int, batch: tirx.PrimExpr, size: int, dtype: str
    ) -> Tensor:
        """The state of every sequence in the batch: ``[batch, size]``."""
        return Tensor(
            _expr=rx.BlockBuilder.current().emit(
                rx.call_dps_packed(
                    "vm.builtin.rnn_state_get",
                    [self._expr, rx.prim_value(layer_id), rx.prim_value(state_id)],
                    out_ty=rx.TensorType((batch, size), dtype),
                )
            )
        )

    def set(self, layer_id: int, state_id: int, value: Tensor) -> RNNState:
        """Store the new state ``[batch, size]``; returns the state object."""
        return RNNState(
            _expr=rx.BlockBuilder.current().emit(
                rx.call_pure_packed(
                    "vm.builtin.rnn_state_set",
                    self._expr,
                    rx.prim_value(layer_id),
                    rx.prim_value(state_id),
                    value._expr,
                    ty_args=rx.AnyType(),
                )
            ),
            _name="rnn_state",
        )
