"""Qwen3.5 vision tower in TVM Relax (transformers' ``Qwen3_5VisionModel``).

One image in, its token embeddings out (architecture doc, "Vision tower"):

    pixels [H, W, 3] uint8 (H, W multiples of 32)
      -> patches [n, 3*2*16*16]: normalised, the still frame repeated to the
         temporal patch, in 2x2 merge-block order (n = H/16 * W/16)
      -> patch_embed (the Conv3d with kernel = stride, as a matmul) [n, d]
      -> + the learned 48x48 position table, bilinearly resampled to the grid
      -> depth x VisionBlock (LayerNorm -> attention with 2-D RoPE -> LayerNorm -> MLP)
      -> merger: LayerNorm, 4 neighbouring patches side by side [n/4, 4d], MLP
      -> [n/4, text hidden] in the model dtype, to replace <|image_pad|> embeddings.

Everything transformers' processor does after the resize (rescale, normalise,
patchify, merge order) happens here, so an app only decodes and resizes.
Parameter names mirror Hugging Face's under ``visual.`` (the checkpoint's
``model.visual.*``).  Shapes: bh, bw = H/32, W/32 (merge blocks per column and
row); n = 4 bh bw patches; d = vision hidden size; hd = d / heads.

Precision: weights in the model dtype, matmuls accumulated in fp32, the
residual stream, norms, RoPE and attention in fp32 (as the decoder does).
The attention is the kernel set's (``kernels.vision_attention``: CPU graph or
GPU kernel, chosen from the target preset like the DeltaNet kernels).
"""

from __future__ import annotations

import numpy as np
from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..config import VISION_ROPE_THETA, ImageProcessorConfig, VisionConfig
from ..kernels import KernelSet

F32 = "float32"
IMAGE_EMBED = "image_embed"  # the exported function (MLC's name)


class Linear(nn.Linear):
    """y = x W^T + b with the weight in the model dtype, accumulated and returned in fp32."""

    def __init__(self, in_features: int, out_features: int, dtype: str):
        super().__init__(in_features, out_features, bias=False, dtype=dtype, out_dtype=F32)
        self.bias = nn.Parameter((out_features,), dtype)  # nn.Linear's would be in out_dtype
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        x = x if x.dtype == self.dtype else x.astype(self.dtype)
        return op.matmul(x, op.permute_dims(self.weight), out_dtype=F32) + self.bias.astype(F32)


class LayerNorm(nn.Module):
    """LayerNorm (eps 1e-6) computed in fp32; weight and bias in the model dtype."""

    def __init__(self, dim: int, dtype: str, eps: float = 1e-6):
        self.weight = nn.Parameter((dim,), dtype)
        self.bias = nn.Parameter((dim,), dtype)
        self.dim, self.eps = dim, eps

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight.astype(F32), self.bias.astype(F32)
        return op.layer_norm(x.astype(F32), self.dim, w, b, eps=self.eps)


def _row_col(i, blocks_w, m: int):
    """Patch ``i`` in merge-block order -> its (row, column) in the patch grid:
    blocks in raster order, the m x m patches of a block in raster order."""
    block, q = i // (m * m), i % (m * m)
    return (block // blocks_w) * m + q // m, (block % blocks_w) * m + q % m


def _as_words(pixels: Tensor) -> Tensor:
    """The uint8 pixels [H, W, 3] viewed (no copy) as uint32 words [H, W*3/4], 4
    bytes each, lowest byte first: WGSL has no 8-bit type, so the kernels read
    words and take bytes out (``_byte``); 32 divides W, so 4 divides a row."""
    height, width, channels = pixels.shape
    view = rx.op.memory.view(pixels._expr, rx.ShapeExpr([height, width * channels // 4]), "uint32")
    return nn.Tensor(_expr=rx.BlockBuilder.current().emit(view, "pixel_words"))


def _width(words: te.Tensor):
    """The image width W of the word view [H, W*3/4]."""
    return words.shape[1] * 4 // 3


def _byte(words: te.Tensor, row, col, ch):
    """pixels[row, col, ch] (uint32) out of the word view."""
    index = col * 3 + ch
    shift = ((index % 4) * 8).astype("uint32")
    return tirx.bitwise_and(
        tirx.shift_right(words[row, index // 4], shift), tirx.const(255, "uint32")
    )


def _patchify(pixels: Tensor, proc: ImageProcessorConfig, channels: int) -> Tensor:
    """words [H, W*3/4] uint32 (``_as_words``) -> [n, C*T*P*P] fp32 (n = H/16 * W/16 patches):
    ``(x * rescale - mean) / std``, each patch's frame repeated T times (a still
    image), in merge-block order, as the processor's ``patchify`` lays them out."""
    p, t, m = proc.patch_size, proc.temporal_patch_size, proc.merge_size
    mean = [float(v) for v in proc.image_mean]
    std = [float(v) for v in proc.image_std]

    def per_channel(values, ch):
        return tirx.Select(
            ch == 0,
            tirx.const(values[0], F32),
            tirx.Select(ch == 1, tirx.const(values[1], F32), tirx.const(values[2], F32)),
        )

    def compute(pix: te.Tensor):
        height, width = pix.shape[0], _width(pix)
        blocks_w = width // (p * m)

        def patch(i, j):
            row, col = _row_col(i, blocks_w, m)
            ch, py, px = (
                j // (t * p * p),
                (j // p) % p,
                j % p,
            )  # j = ((ch * T + frame) * P + py) * P + px
            x = _byte(pix, row * p + py, col * p + px, ch).astype(F32) * tirx.const(
                proc.rescale_factor, F32
            )
            return (x - per_channel(mean, ch)) / per_channel(std, ch)

        n = (height // (p * m)) * blocks_w * (m * m)
        return te.compute((n, channels * t * p * p), patch, name="patchify")

    return op.tensor_expr_op(compute, "patchify", [pixels])


class Conv3dPatch(nn.Module):
    """The weights of Hugging Face's ``Conv3d``: weight [d, C, T, P, P] and bias [d]."""

    def __init__(self, hidden: int, shape: tuple[int, ...], dtype: str):
        self.weight = nn.Parameter((hidden, *shape), dtype)
        self.bias = nn.Parameter((hidden,), dtype)


class PatchEmbed(nn.Module):
    """Conv3d(C, d, kernel = stride = [T, P, P]) with bias; with kernel = stride it
    is one matmul of each flattened patch with the flattened kernel."""

    def __init__(self, v: VisionConfig, dtype: str):
        self.shape = (v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        self.proj = Conv3dPatch(v.hidden_size, self.shape, dtype)
        self.hidden, self.dtype = v.hidden_size, dtype

    def forward(self, patches: Tensor) -> Tensor:  # [n, C*T*P*P] fp32 -> [n, d] fp32
        kernel = op.reshape(self.proj.weight, (self.hidden, int(np.prod(self.shape))))
        x = patches.astype(self.dtype) if self.dtype != F32 else patches
        return op.matmul(x, op.permute_dims(kernel), out_dtype=F32) + self.proj.bias.astype(F32)


class PositionTable(nn.Module):
    """The learned side x side position table, resampled to the image's patch
    grid as transformers does it (``F.interpolate(bilinear, align_corners=True)``
    written as 4 taps): source coordinate ``r * (side-1) / max(rows-1, 1)``,
    taps floor and floor+1 clamped to the table, weights ``max(1 - |distance|, 0)``."""

    def __init__(self, v: VisionConfig, dtype: str, merge: int):
        self.weight = nn.Parameter((v.num_position_embeddings, v.hidden_size), dtype)
        self.side, self.merge = v.grid_side, merge

    def forward(self, pixels: Tensor, patches: Tensor, factor: int) -> Tensor:  # -> [n, d] fp32
        """``pixels`` (the word view) gives the grid's size, ``patches`` [n, K] the patch count."""
        side, m = self.side, self.merge

        def axis(index, size):
            """The two taps and weights of one axis (fp32, as the reference)."""
            src = index.astype(F32) * tirx.const(side - 1, F32)
            src = src / tirx.max(size - 1, 1).astype(F32)
            floor = tirx.floor(src)
            taps, weights = [], []
            for offset in (0, 1):
                taps.append(tirx.min(tirx.max(floor.astype("int64") + offset, 0), side - 1))
                distance = tirx.abs(src - floor - tirx.const(offset, F32))
                weights.append(tirx.max(tirx.const(1.0, F32) - distance, tirx.const(0.0, F32)))
            return taps, weights

        def compute(table: te.Tensor, pix: te.Tensor, patches: te.Tensor):
            rows, cols = pix.shape[0] // factor * m, _width(pix) // factor * m

            def value(i, c):
                row, col = _row_col(i, _width(pix) // factor, m)
                (r0, r1), (wr0, wr1) = axis(row, rows)
                (c0, c1), (wc0, wc1) = axis(col, cols)
                acc = tirx.const(0.0, F32)
                for r, wr in ((r0, wr0), (r1, wr1)):
                    for cc, wc in ((c0, wc0), (c1, wc1)):
                        acc = acc + table[r * side + cc, c].astype(F32) * (wr * wc)
                return acc

            return te.compute((patches.shape[0], table.shape[1]), value, name="position_table")

        return op.tensor_expr_op(compute, "interpolate_positions", [self.weight, pixels, patches])


def _rope_2d(pixels: Tensor, patches: Tensor, factor: int, head_dim: int, merge: int):
    """cos and sin [n, hd] of the tower's axial RoPE: the first hd/2 angles rotate
    by the patch's row, the next by its column, each with hd/4 frequencies
    ``theta ** (-2k / (hd/2))``; the layout is transformers' (cat(h, w) twice).
    ``pixels`` gives the grid's size, ``patches`` [n, K] the patch count."""
    quarter = head_dim // 4
    spatial = head_dim // 2
    inv_freq = 1.0 / (
        VISION_ROPE_THETA ** (np.arange(0, spatial, 2, dtype=np.float32) / np.float32(spatial))
    )
    inv_freq = inv_freq.astype(np.float32)

    def compute(pix: te.Tensor, patches: te.Tensor):
        blocks_w = _width(pix) // factor

        def angle(i, j):
            row, col = _row_col(i, blocks_w, merge)
            k = j % spatial
            freq = tirx.const(0.0, F32)
            for idx in range(quarter):  # a small constant table, unrolled
                freq = tirx.Select(k % quarter == idx, tirx.const(float(inv_freq[idx]), F32), freq)
            return tirx.Select(k < quarter, row, col).astype(F32) * freq

        n = patches.shape[0]
        cos = te.compute((n, head_dim), lambda i, j: tirx.cos(angle(i, j)), name="rope_cos")
        sin = te.compute((n, head_dim), lambda i, j: tirx.sin(angle(i, j)), name="rope_sin")
        return [cos, sin]

    cos, sin = op.tensor_expr_op(compute, "vision_rope", [pixels, patches])
    return cos, sin


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin over the whole head: x [n, heads, hd] fp32, cos/sin [n, hd]."""
    hd = x.shape[-1]
    x1, x2 = op.split(x, 2, axis=-1)
    rotated = op.concat([op.negative(x2), x1], dim=-1)
    cos = op.reshape(cos, (cos.shape[0], 1, hd))
    sin = op.reshape(sin, (sin.shape[0], 1, hd))
    return x * cos + rotated * sin


class VisionAttention(nn.Module):
    """Non-causal attention over the image's patches: fused qkv (with bias),
    2-D RoPE on q and k, softmax(q k^T / sqrt(hd)) v, then proj."""

    def __init__(self, v: VisionConfig, dtype: str, kernels: KernelSet):
        self.kernels = kernels
        self.heads, self.head_dim = v.num_heads, v.head_dim
        self.qkv = Linear(v.hidden_size, 3 * v.hidden_size, dtype)
        self.proj = Linear(v.hidden_size, v.hidden_size, dtype)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # x [n, d]
        n, d = x.shape
        hn, hd = self.heads, self.head_dim
        qkv = op.reshape(self.qkv(x), (n, 3, hn, hd))
        q, k, v = (op.reshape(t, (n, hn, hd)) for t in op.split(qkv, 3, axis=1))
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = self.kernels.vision_attention(q, k, v)  # [n, hn, hd] (kernels/vision_attention.py)
        return self.proj(op.reshape(out, (n, d)))


class VisionMLP(nn.Module):
    """fc2(gelu_tanh(fc1(x)))."""

    def __init__(self, v: VisionConfig, dtype: str):
        self.linear_fc1 = Linear(v.hidden_size, v.intermediate_size, dtype)
        self.linear_fc2 = Linear(v.intermediate_size, v.hidden_size, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_fc2(op.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    """Pre-norm ViT block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, v: VisionConfig, dtype: str, kernels: KernelSet):
        self.norm1 = LayerNorm(v.hidden_size, dtype)
        self.norm2 = LayerNorm(v.hidden_size, dtype)
        self.attn = VisionAttention(v, dtype, kernels)
        self.mlp = VisionMLP(v, dtype)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


def _merge_blocks(x: Tensor, merged: int) -> Tensor:
    """[n, d] -> [t, 4d], t = n / 4: the 4 patches of a merge block (consecutive)
    side by side.  A copy (a reshape cannot prove that 4 divides n) whose
    token count is bound to a variable of its own (see VisionTower.forward)."""
    d = x.shape[1]

    def compute(x: te.Tensor):
        per_block = merged // d
        return te.compute(
            (x.shape[0] // per_block, merged),
            lambda i, j: x[i * per_block + j // d, j % d],
            name="merge_blocks",
        )

    return _as_variable(op.tensor_expr_op(compute, "merge_blocks", [x]), "image_tokens")


def _as_variable(x: Tensor, name: str) -> Tensor:
    """``x`` with its first dimension bound to a fresh variable (a match_cast)."""
    dim = tirx.Var(name, "int64")
    return nn.Tensor(
        _expr=rx.BlockBuilder.current().match_cast(
            x._expr, rx.TensorType([dim, *x.shape[1:]], x.dtype)
        )
    )


class PatchMerger(nn.Module):
    """LayerNorm, then each 2x2 block of patches (consecutive in merge order)
    side by side [n/4, 4d] -> fc1 -> GELU (erf) -> fc2 [n/4, text hidden]."""

    def __init__(self, v: VisionConfig, dtype: str):
        self.merged = v.hidden_size * v.spatial_merge_size**2
        self.norm = LayerNorm(v.hidden_size, dtype)
        self.linear_fc1 = Linear(self.merged, self.merged, dtype)
        self.linear_fc2 = Linear(self.merged, v.out_hidden_size, dtype)

    def forward(self, x: Tensor) -> Tensor:  # [n, d] -> [n/4, text hidden]
        x = _merge_blocks(self.norm(x), self.merged)
        return self.linear_fc2(op.gelu(self.linear_fc1(x)))


class VisionTower(nn.Module):
    """``Qwen3_5VisionModel``: uint8 pixels -> image token embeddings."""

    def __init__(self, v: VisionConfig, proc: ImageProcessorConfig, dtype: str, kernels: KernelSet):
        proc.check(v)
        self.config, self.proc, self.dtype = v, proc, dtype
        self.patch_embed = PatchEmbed(v, dtype)
        self.pos_embed = PositionTable(v, dtype, proc.merge_size)
        self.blocks = nn.ModuleList([VisionBlock(v, dtype, kernels) for _ in range(v.depth)])
        self.merger = PatchMerger(v, dtype)

    def forward(self, pixels: Tensor) -> Tensor:
        """[H, W, 3] uint8 -> [H/32 * W/32, text hidden] in the model dtype."""
        v, m, f = self.config, self.proc.merge_size, self.proc.factor
        # The patch count as a variable of its own: with shapes that are H // 32 * (W // 32)
        # expressions, TVM 0.27's FuseOps fuses across a residual branch and drops a
        # LayerNorm, and FuseTIR refuses products of variables (docs/surprises.md);
        # bound by a match_cast, every later shape is [n, ...].
        words = _as_words(pixels)  # [H, W*3/4] uint32, the same bytes
        patches = _as_variable(_patchify(words, self.proc, v.in_channels), "image_patches")
        x = self.patch_embed(patches)  # [n, d]
        x = x + self.pos_embed(words, patches, f)
        cos, sin = _rope_2d(words, patches, f, v.head_dim, m)  # [n, hd] each
        for block in self.blocks:
            x = block(x, cos, sin)
        out = self.merger(x)
        return out if self.dtype == F32 else out.astype(self.dtype)


class VisionModel(nn.Module):
    """The exported model function: ``image_embed`` over the tower, whose
    parameters are named ``visual.*`` (the checkpoint's ``model.visual.*``)."""

    def __init__(self, v: VisionConfig, proc: ImageProcessorConfig, dtype: str, kernels: KernelSet):
        self.visual = VisionTower(v, proc, dtype, kernels)

    def image_embed(self, pixels: Tensor) -> Tensor:
        return self.visual(pixels)

    def get_default_spec(self):
        spec = {
            IMAGE_EMBED: {
                "pixels": nn.spec.Tensor(["height", "width", 3], "uint8"),
                "$": {"param_mode": "packed", "effect_mode": "none"},
            }
        }
        return nn.spec.ModuleSpec.from_raw(spec, self)
