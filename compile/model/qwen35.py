"""Qwen3.5 text decoder in TVM Relax (``tvm.relax.frontend.nn``).

One module per block of the architecture doc; module and parameter names
mirror Hugging Face's, so checkpoint tensors map by dropping the
``model.language_model.`` prefix.  Shapes: b = batch (sequences), s = tokens
per sequence in this call, h = hidden size.

Every layer is pre-norm:  h = x + mixer(norm1(x));  out = h + mlp(norm2(h)),
where the mixer is Gated DeltaNet (linear attention, recurrent state) or gated
full attention (paged KV cache), as ``config.layer_types`` says.

The hand-written kernels (causal conv, gated delta rule) are not chosen here:
the model is given a :class:`..kernels.KernelSet` (CPU, GPU, or GPU emulated on
the CPU; ``kernels.kernel_set_for(preset)`` picks it) and passes it down to
the DeltaNet blocks.
"""

from __future__ import annotations

from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from ..config import FULL, Qwen35Config
from ..kernels import KernelSet
from .rnn_state import RNNState

F32 = "float32"


class Linear(nn.Linear):
    """y = x W^T, accumulated in fp32; returned in the model dtype, or in fp32
    for the projections that write into the (fp32) residual stream."""

    def __init__(self, in_features: int, out_features: int, dtype: str, *, residual: bool = False):
        super().__init__(in_features, out_features, bias=False, dtype=dtype, out_dtype=F32)
        self.out = F32 if residual else dtype

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``residual`` (fp32): ``residual + y``, the add into the residual stream (an int8
        GEMV of q4f16_i8 does it as it stores)."""
        y = super().forward(x)
        y = y if self.out == F32 else y.astype(self.out)
        return y if residual is None else residual + y

    def swiglu(self, up: Linear, x: Tensor) -> Tensor:
        """``silu(self(x)) * up(x)`` (q4f16_i8: one kernel for both projections)."""
        return op.silu(self(x)) * up(x)


class Embedding(nn.Embedding):
    """Token embedding; out-of-range ids are clipped, never read out of bounds
    (the bindings reject them before they get here)."""

    def forward(self, ids: Tensor) -> Tensor:
        return nn.wrap_nested(rx.op.take(self.weight._expr, ids._expr, axis=0, mode="clip"), "take")


def _rms_norm(x: Tensor, weight: Tensor, eps: float, offset: float) -> Tensor:
    """x * rsqrt(mean(x^2) + eps) * (offset + w) over the last axis, in fp32 (TVM's rms_norm
    arithmetic), as ONE kernel: the weight's cast and offset are computed where it is read
    (as Relax ops of their own they were a kernel on every call)."""

    def compute(x: te.Tensor, w: te.Tensor):
        d = x.shape[-1]
        r = te.reduce_axis((tirx.IntImm("int64", 0), d), name="k")
        square_sum = te.compute(
            x.shape[:-1],
            lambda *i: te.sum(x[(*i, r)].astype(F32) * x[(*i, r)].astype(F32), axis=r),
            name="square_sum",
        )

        def norm(*i):
            inv = tirx.rsqrt(square_sum[i[:-1]] / tirx.const(float(int(d)), F32) + eps)
            return inv * x[i].astype(F32) * (w[i[-1]].astype(F32) + tirx.const(offset, F32))

        return te.compute(x.shape, norm, name="rms_norm")

    return op.tensor_expr_op(compute, "rms_norm", [x, weight])


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm, in fp32:  x * rsqrt(mean(x^2) + eps) * (1 + w).
    Returns the model dtype (the input may be the fp32 residual stream)."""

    def __init__(self, dim: int, eps: float, dtype: str):
        self.weight = nn.Parameter((dim,), dtype)
        self.eps, self.dtype = eps, dtype

    def forward(self, x: Tensor) -> Tensor:
        y = _rms_norm(x, self.weight, self.eps, offset=1.0)
        return y if self.dtype == F32 else y.astype(self.dtype)


class RMSNormGated(nn.Module):
    """DeltaNet output norm (plain weight):  w * normalize(x) * silu(z), in fp32."""

    def __init__(self, dim: int, eps: float, dtype: str):
        self.weight = nn.Parameter((dim,), dtype)
        self.eps = eps

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return _rms_norm(x, self.weight, self.eps, offset=0.0) * op.silu(z.astype(F32))


class MLP(nn.Module):
    """SwiGLU:  down(silu(gate(x)) * up(x)), added to the residual stream."""

    def __init__(self, c: Qwen35Config, dtype: str):
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, dtype)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, dtype)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, dtype, residual=True)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """``residual + down(...)``: the layer's residual add, done by the down projection."""
        return self.down_proj(self.gate_proj.swiglu(self.up_proj, x), residual)


def mrope_shift_compute(c: Qwen35Config):
    """The TE compute of :func:`mrope_shift`: (x, offsets) -> shifted x."""
    r, half = c.rotary_dim, c.rotary_dim // 2
    _, s_h, s_w = c.mrope_section
    theta = float(c.rope_theta)

    def compute(x: te.Tensor, off: te.Tensor):
        def f(b, s, h, j):
            i = j % half  # frequency index (both halves share it)
            sec = tirx.Select(
                tirx.all(i % 3 == 1, i < 3 * s_h),
                1,
                tirx.Select(tirx.all(i % 3 == 2, i < 3 * s_w), 2, 0),
            )
            o = off[b, s, sec]
            inv_freq = 1.0 / tirx.power(
                tirx.const(theta, F32), (2 * i).astype(F32) / tirx.const(r, F32)
            )
            angle = o.astype(F32) * inv_freq
            partner = x[b, s, h, (j + half) % r].astype(F32)  # x[j + half] or x[j - half]
            sign = tirx.Select(j < half, tirx.const(-1.0, F32), tirx.const(1.0, F32))
            rotated = x[b, s, h, j].astype(F32) * tirx.cos(angle) + sign * partner * tirx.sin(angle)
            keep = tirx.any(j >= r, o == 0)
            return tirx.Select(keep, x[b, s, h, j], rotated.astype(x.dtype))

        return te.compute(x.shape, f, name="mrope_shift")

    return compute


def mrope_shift(x: Tensor, offsets: Tensor, c: Qwen35Config) -> Tensor:
    """M-RoPE as a shift of the KV cache's 1-D RoPE.

    x [b, s, heads, d]; offsets [b, s, 3] int32: each token's (t, h, w) position
    minus its index in the sequence (the position the KV cache rotates by).
    Frequency i of the first rotary_dim dims (NeoX halves) belongs to section
    t, h or w, interleaved as transformers' ``recomposition_frequencies`` does
    (i % 3 == 1 and i < 3 * section[1] -> h; i % 3 == 2 and i < 3 * section[2]
    -> w; else t).  Rotating by offset * inv_freq here and by index * inv_freq
    in the cache rotates by position * inv_freq in all.  Where the offset is 0
    (every token of a text-only prompt) the value is copied, not rotated, so
    text is bit-identical to the cache's RoPE alone."""
    return op.tensor_expr_op(mrope_shift_compute(c), "mrope_shift", [x, offsets])


class GatedAttention(nn.Module):
    """Full attention with an output gate.

    q_proj yields, per head, [q_h | gate_h]; q and k are RMS-normed per head,
    shifted for M-RoPE (:func:`mrope_shift`), rotated by RoPE (partial, NeoX)
    inside the paged KV cache, then GQA attention, then attn * sigmoid(gate)
    and o_proj."""

    def __init__(self, c: Qwen35Config, dtype: str):
        self.config = c
        self.num_heads, self.num_kv_heads, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        self.q_proj = Linear(c.hidden_size, self.num_heads * self.head_dim * 2, dtype)
        self.k_proj = Linear(c.hidden_size, self.num_kv_heads * self.head_dim, dtype)
        self.v_proj = Linear(c.hidden_size, self.num_kv_heads * self.head_dim, dtype)
        self.o_proj = Linear(self.num_heads * self.head_dim, c.hidden_size, dtype, residual=True)
        self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps, dtype)
        self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps, dtype)

    def forward(
        self,
        x: Tensor,
        offsets: Tensor | None,
        kv_cache: PagedKVCache,
        attn_layer_id: int,
        residual: Tensor,
    ) -> Tensor:
        """``residual + attention(x)``; ``offsets`` None: text only, the cache's RoPE alone
        (as all-zero offsets give)."""
        b, s, _ = x.shape
        hq, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        q_gate = op.reshape(self.q_proj(x), (b, s, hq, 2 * d))
        q, gate = op.split(q_gate, 2, axis=-1)  # [b, s, hq, d] each
        q = self.q_norm(q)
        k = self.k_norm(op.reshape(self.k_proj(x), (b, s, hk, d)))
        if offsets is not None:
            q, k = mrope_shift(q, offsets, self.config), mrope_shift(k, offsets, self.config)
        v = op.reshape(self.v_proj(x), (b, s, hk, d))
        qkv = op.concat([q, k, v], dim=2)  # [b, s, hq + 2 hk, d]
        attn = kv_cache.attention_with_fused_qkv(attn_layer_id, qkv, hq, sm_scale=d**-0.5)
        attn = op.reshape(attn, (b, s, hq * d)) * op.sigmoid(op.reshape(gate, (b, s, hq * d)))
        return self.o_proj(attn, residual)


class CausalConv1d(nn.Module):
    """Depthwise causal conv (kernel K, no bias) over the q|k|v channels; the
    weight keeps Hugging Face's Conv1d shape [C, 1, K]."""

    def __init__(self, channels: int, kernel: int, dtype: str, kernels: KernelSet):
        self.weight = nn.Parameter((channels, 1, kernel), dtype)
        self.channels, self.kernel = channels, kernel
        self.kernels = kernels

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """x [b, s, C], state [b, C, K-1] -> (silu(conv(x)) [b, s, C], new state)."""
        weight = op.reshape(self.weight, (self.channels, self.kernel))
        return self.kernels.causal_conv1d(x, state, weight)


def _l2norm(x: Tensor, scale: float = 1.0) -> Tensor:
    """x * rsqrt(sum(x^2) + 1e-6) * scale over the last axis, in fp32."""
    # x.astype twice: one cast fuses into the sum's kernel, the other into the division's
    # (one shared cast was a kernel of its own)
    norm = op.sqrt(op.sum(op.square(x.astype(F32)), axis=-1, keepdims=True) + 1e-6)
    y = op.divide(x.astype(F32), norm)
    return y * scale if scale != 1.0 else y


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet (linear attention with a delta-rule recurrent state).

    State per sequence: conv state [C, K-1] (model dtype) and S [Hv, Dk, Dv]
    (fp32), kept in the RNN state object as state ids 0 and 1."""

    def __init__(self, c: Qwen35Config, dtype: str, kernels: KernelSet):
        self.kernels = kernels
        self.hk, self.hv = c.linear_num_key_heads, c.linear_num_value_heads
        self.dk, self.dv = c.linear_key_head_dim, c.linear_value_head_dim
        self.conv_dim, self.kernel = c.conv_dim, c.linear_conv_kernel_dim
        self.dtype = dtype
        self.in_proj_qkv = Linear(c.hidden_size, c.conv_dim, dtype)
        self.in_proj_z = Linear(c.hidden_size, c.linear_value_dim, dtype)
        self.in_proj_b = Linear(c.hidden_size, self.hv, dtype)
        self.in_proj_a = Linear(c.hidden_size, self.hv, dtype)
        self.conv1d = CausalConv1d(c.conv_dim, c.linear_conv_kernel_dim, dtype, kernels)
        self.A_log = nn.Parameter((self.hv,), F32)  # pylint: disable=invalid-name
        self.dt_bias = nn.Parameter((self.hv,), F32)
        self.norm = RMSNormGated(self.dv, c.rms_norm_eps, dtype)
        self.out_proj = Linear(c.linear_value_dim, c.hidden_size, dtype, residual=True)

    def state_shapes(self) -> list[tuple[int, str]]:
        """(flat size, dtype) of the two states, for RNNState.create."""
        return [(self.conv_dim * (self.kernel - 1), self.dtype), (self.hv * self.dk * self.dv, F32)]

    def forward(
        self, x: Tensor, state: RNNState, lin_layer_id: int, residual: Tensor
    ) -> tuple[Tensor, RNNState]:
        """``residual + DeltaNet(x)`` and the new state."""
        b, s, _ = x.shape
        (conv_size, _), (rec_size, _) = self.state_shapes()
        conv_state = op.reshape(
            state.get(lin_layer_id, 0, b, conv_size, self.dtype),
            (b, self.conv_dim, self.kernel - 1),
        )
        rec_state = op.reshape(
            state.get(lin_layer_id, 1, b, rec_size, F32), (b, self.hv, self.dk, self.dv)
        )

        mixed, conv_state = self.conv1d(self.in_proj_qkv(x), conv_state)  # [b, s, C]
        q, k, v = op.split(mixed, [self.hk * self.dk, 2 * self.hk * self.dk], axis=-1)
        q = _l2norm(op.reshape(q, (b, s, self.hk, self.dk)), scale=self.dk**-0.5)
        k = _l2norm(op.reshape(k, (b, s, self.hk, self.dk)))
        v = op.reshape(v, (b, s, self.hv, self.dv)).astype(F32)  # q, k, v meet the state in fp32

        beta = op.sigmoid(self.in_proj_b(x).astype(F32))  # [b, s, Hv]
        g = op.negative(op.exp(self.A_log)) * op.softplus(
            self.in_proj_a(x).astype(F32) + self.dt_bias
        )  # log-decay
        # o [b, s, Hv, Dv] fp32
        o, rec_state = self.kernels.gated_delta_rule(q, k, v, g, beta, rec_state)

        z = op.reshape(self.in_proj_z(x), (b, s, self.hv, self.dv))
        o = self.norm(o, z).astype(self.dtype)
        state = state.set(lin_layer_id, 0, op.reshape(conv_state, (b, conv_size)))
        state = state.set(lin_layer_id, 1, op.reshape(rec_state, (b, rec_size)))
        return self.out_proj(op.reshape(o, (b, s, self.hv * self.dv)), residual), state


class DecoderLayer(nn.Module):
    def __init__(self, c: Qwen35Config, layer_type: str, dtype: str, kernels: KernelSet):
        self.is_full = layer_type == FULL
        if self.is_full:
            self.self_attn = GatedAttention(c, dtype)
        else:
            self.linear_attn = GatedDeltaNet(c, dtype, kernels)
        self.mlp = MLP(c, dtype)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)

    def forward(
        self, x: Tensor, offsets: Tensor, kv_cache: PagedKVCache, state: RNNState, mixer_id: int
    ):
        if self.is_full:
            h = self.self_attn(self.input_layernorm(x), offsets, kv_cache, mixer_id, x)
        else:
            h, state = self.linear_attn(self.input_layernorm(x), state, mixer_id, x)
        return self.mlp(self.post_attention_layernorm(h), h), state


def _last_token(x: Tensor) -> Tensor:
    """[b, s, h] -> [b, 1, h], the last position."""

    def compute(x: te.Tensor):
        b, s, h = x.shape
        return te.compute((b, 1, h), lambda i, _, j: x[i, s - 1, j], name="last_token")

    return op.tensor_expr_op(compute, "last_token", [x])


class Qwen35LM(nn.Module):
    """The text decoder with its language-model head.

    ``target``: the paged KV cache picks CPU or GPU attention kernels by it;
    ``kernels``: the DeltaNet kernels (``kernels.kernel_set_for(preset)``).
    A host twin has the CPU's target and the GPU's kernels emulated on the CPU."""

    def __init__(self, c: Qwen35Config, dtype: str, target: Target, *, kernels: KernelSet):
        self.config, self.dtype = c, dtype
        self.target = target
        self.kernels = kernels
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, dtype)
        self.layers = nn.ModuleList([DecoderLayer(c, t, dtype, kernels) for t in c.layer_types])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Linear(
                c.hidden_size, c.vocab_size, bias=False, dtype=dtype, out_dtype=F32
            )
        # mixer_ids[i]: index of layer i among the layers of its kind (KV cache
        # layer id for attention, RNN state layer id for DeltaNet).
        full, lin = c.full_attention_layers, c.linear_attention_layers
        self.mixer_ids = [
            full.index(i) if i in full else lin.index(i) for i in range(c.num_hidden_layers)
        ]

    # ---- the network ------------------------------------------------------
    def _logits(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        if self.config.tie_word_embeddings:
            if hasattr(self.embed_tokens, "lm_head_forward"):  # quantized table
                return self.embed_tokens.lm_head_forward(x)
            return op.matmul(x, op.permute_dims(self.embed_tokens.weight), out_dtype=F32)
        return self.lm_head(x)

    def _decoder(self, x: Tensor, offsets: Tensor | None, kv_cache: PagedKVCache, state: RNNState):
        if x.dtype != F32:  # the residual stream is kept in fp32 whatever the model dtype
            x = x.astype(F32)
        for layer, mixer_id in zip(self.layers, self.mixer_ids):
            x, state = layer(x, offsets, kv_cache, state, mixer_id)
        return x, state

    # ---- exported functions -------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        """[s] int32 -> [s, h]"""
        return self.embed_tokens(input_ids)

    # rope_offsets [b, s, 3] int32: (t, h, w) position - index in the sequence, per
    # token (all 0 for text-only sequences; see mrope_shift).
    def prefill(
        self, input_embed: Tensor, rope_offsets: Tensor, kv_cache: PagedKVCache, state: RNNState
    ):
        """One sequence, s new tokens continuing its cache -> logits of the last one [1, 1, V]."""
        x, state = self._decoder(input_embed, rope_offsets, kv_cache, state)
        return self._logits(_last_token(x)), kv_cache, state

    def prefill_all_logits(
        self, input_embed: Tensor, rope_offsets: Tensor, kv_cache: PagedKVCache, state: RNNState
    ):
        """Like prefill, returning the logits of every position [1, s, V] (for parity)."""
        x, state = self._decoder(input_embed, rope_offsets, kv_cache, state)
        return self._logits(x), kv_cache, state

    def decode(
        self, input_embed: Tensor, rope_offsets: Tensor, kv_cache: PagedKVCache, state: RNNState
    ):
        """b sequences, one new token each: [b, 1, h] -> logits [b, 1, V]."""
        x, state = self._decoder(input_embed, rope_offsets, kv_cache, state)
        return self._logits(x), kv_cache, state

    # ---- WebLLM's names and arguments (compile/model/webllm.py), text only ----------
    def batch_prefill(
        self, input_embeds: Tensor, logit_positions: Tensor, kv_cache: PagedKVCache, state: RNNState
    ):
        """One sequence, s new text tokens: [1, s, h] -> logits at ``logit_positions`` [1, p, V]."""
        x, state = self._decoder(input_embeds, None, kv_cache, state)
        return self._logits(op.take(x, logit_positions, axis=1)), kv_cache, state

    def batch_decode(self, input_embeds: Tensor, kv_cache: PagedKVCache, state: RNNState):
        """b sequences, one new text token each: [b, 1, h] -> logits [b, 1, V]."""
        x, state = self._decoder(input_embeds, None, kv_cache, state)
        return self._logits(x), kv_cache, state

    def create_paged_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        """The KV cache of the full-attention layers only (layer ids 0..n_full-1)."""
        c = self.config
        n_full = len(c.full_attention_layers)
        return TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, n_full]),
            num_hidden_layers=n_full,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            qk_head_dim=c.head_dim,
            v_head_dim=c.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=c.rope_theta,
            rope_scaling={},
            rope_ext_factors=rx.prim_value(0),  # none: not a Tensor
            rotary_dim=c.rotary_dim,
            enable_disaggregation=False,
            dtype=self.dtype,
            target=self.target,
        )

    def create_rnn_state(self, max_batch_size: tirx.Var, max_history: tirx.Var) -> RNNState:
        """Conv and DeltaNet states of the linear-attention layers."""
        lin = self.config.linear_attention_layers
        shapes = self.layers[lin[0]].linear_attn.state_shapes()
        return RNNState.create(max_batch_size, max_history, len(lin), shapes)

    def get_default_spec(self, *, webllm: bool = False):
        """The exported functions; ``webllm``: also WebLLM's batch_prefill and batch_decode
        (its cache constructor is an alias: compile/model/webllm.py)."""
        h = self.config.hidden_size
        common = {"$": {"param_mode": "packed", "effect_mode": "none"}}
        caches = {
            "kv_cache": nn.spec.Object(object_type=PagedKVCache),
            "state": nn.spec.Object(object_type=RNNState),
        }
        spec = {
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), **common},
            "prefill": {
                "input_embed": nn.spec.Tensor([1, "seq_len", h], self.dtype),
                "rope_offsets": nn.spec.Tensor([1, "seq_len", 3], "int32"),
                **caches,
                **common,
            },
            "prefill_all_logits": {
                "input_embed": nn.spec.Tensor([1, "seq_len", h], self.dtype),
                "rope_offsets": nn.spec.Tensor([1, "seq_len", 3], "int32"),
                **caches,
                **common,
            },
            "decode": {
                "input_embed": nn.spec.Tensor(["batch_size", 1, h], self.dtype),
                "rope_offsets": nn.spec.Tensor(["batch_size", 1, 3], "int32"),
                **caches,
                **common,
            },
            "create_paged_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
            "create_rnn_state": {
                "max_batch_size": int,
                "max_history": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }
        if webllm:
            spec["batch_prefill"] = {
                "input_embeds": nn.spec.Tensor([1, "seq_len", h], self.dtype),
                "logit_positions": nn.spec.Tensor(["num_logits"], "int32"),
                **caches,
                **common,
            }
            spec["batch_decode"] = {
                "input_embeds": nn.spec.Tensor(["batch_size", 1, h], self.dtype),
                **caches,
                **common,
            }
        return nn.spec.ModuleSpec.from_raw(spec, self)
