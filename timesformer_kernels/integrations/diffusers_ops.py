"""Building blocks of the diffusers swap-in: channel-first GEMMs, AnimateDiff's GroupNorm and
the temporal transformer blocks run in frame-major token order, with no permute of the hidden
state.

Frame-major tokens: a clip of F frames of S = H·W pixels is (B, F·S, C), token (f, s) at row
f·S + s, which is the op's ``token_order="time_major"`` with N = S. Channel-first tensors are
(B·F, C, S), the layout of a UNet's feature maps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layout import stats_dtype
from ..ops import temporal_attention

# diffusers' processors whose maths the fused path reproduces (class name -> uses to_qkv).
DEFAULT_PROCESSORS = {"AttnProcessor2_0": False, "AttnProcessor": False, "FusedAttnProcessor2_0": True}


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a GEMM on ``x`` runs in: the autocast dtype inside an autocast region, else x's."""
    kind = x.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _weight_grad(a: Tensor, b: Tensor) -> Tensor:
    """sum_i a[i] @ b[i] for contiguous a (n, p, s), b (n, s, q): the weight gradient of a GEMM
    batched over frames. Either a batched GEMM and a sum over its (n, p, q) result, or one GEMM
    after copying a to (p, n·s); whichever temporary is smaller (q <= s: the product, else the
    copy of a)."""
    n, p, s = a.shape
    if b.shape[2] <= s:
        return torch.bmm(a, b).sum(0)
    return a.transpose(0, 1).reshape(p, n * s) @ b.reshape(n * s, -1)


class _LinearFromChannels(torch.autograd.Function):
    """y (B·F, S, out) = x[i]ᵀ @ weightᵀ + bias for channel-first x (B·F, in, S): one batched
    GEMM reading x through its transpose. Autograd's rule for an expanded weight would build
    a (B·F, in, out) gradient and sum it; ``_weight_grad`` picks the cheaper way."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        w = weight.t().expand(x.shape[0], -1, -1)
        return torch.bmm(x.mT, w) if bias is None else torch.baddbmm(bias, x.mT, w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        dx = torch.bmm(weight.t().expand(x.shape[0], -1, -1), grad.mT) if ctx.needs_input_grad[0] else None
        dw = _weight_grad(x, grad).t() if ctx.needs_input_grad[1] else None
        db = grad.sum((0, 1)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


class _LinearToChannels(torch.autograd.Function):
    """y (B·F, out, S) = weight @ h[i]ᵀ + bias for tokens h (B·F, S, in), as batched GEMMs on
    transposed views; the backward writes dh in h's layout (autograd's bmm rule would give its
    transpose, which the views upstream of h would then copy)."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        w = weight.expand(h.shape[0], -1, -1)
        return torch.bmm(w, h.mT) if bias is None else torch.baddbmm(bias[:, None], w, h.mT)

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight = ctx.saved_tensors
        dh = torch.bmm(grad.mT, weight.expand(h.shape[0], -1, -1)) if ctx.needs_input_grad[0] else None
        dw = _weight_grad(grad, h) if ctx.needs_input_grad[1] else None
        db = grad.sum((0, 2)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dh, dw, db


class _ZeroGradients(torch.autograd.Function):
    """``x`` unchanged; each of ``unused`` (tensors upstream's code uses but whose gradient is
    exactly zero there) gets a zero gradient, so that autograd, DDP and optimizers see them used
    as upstream's, without computing what they would feed."""

    @staticmethod
    def forward(ctx, x: Tensor, *unused: Tensor) -> Tensor:
        ctx.specs = [(u.shape, u.dtype, u.device) for u in unused]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        zeros = tuple(torch.zeros(shape, dtype=dtype, device=device) if needed else None
                      for (shape, dtype, device), needed in zip(ctx.specs, ctx.needs_input_grad[1:]))
        return (grad,) + zeros


def with_zero_gradients(x: Tensor, modules) -> Tensor:
    """``x``, with the parameters of ``modules`` in the graph and a zero gradient each."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if not params or not torch.is_grad_enabled():
        return x
    return _ZeroGradients.apply(x, *params)


def _params(linear: nn.Linear, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    return linear.weight.to(dtype), None if linear.bias is None else linear.bias.to(dtype)


def linear_from_channels(x: Tensor, linear: nn.Linear) -> Tensor:
    """``linear`` applied to every pixel of channel-first x (B·F, C, S): (B·F, S, out), no copy
    of x in the forward."""
    dtype = compute_dtype(x)
    return _LinearFromChannels.apply(x.to(dtype), *_params(linear, dtype))


def linear_to_channels(h: Tensor, linear: nn.Linear) -> Tensor:
    """``linear`` applied to tokens h (B·F, S, in), written channel-first (B·F, out, S): no copy
    of h or of the result in the forward."""
    dtype = compute_dtype(h)
    return _LinearToChannels.apply(h.to(dtype), *_params(linear, dtype))


def group_norm_clips(x: Tensor, batch: int, frames: int, norm: nn.GroupNorm, split=None) -> Tensor:
    """AnimateDiff's GroupNorm of channel-first x (B·F, C, S), in x's layout.

    Upstream normalises the (B, C, F, H, W) permutation: statistics per (clip, group) over the
    group's channels, all frames and all pixels. Computed here as x·a + d with per-(clip,
    channel) a = rstd·weight and d = bias - mean·a, so one pass writes the result. With a
    ``split`` (``parallel.FrameSplit``), x holds this rank's frames and the statistics combine
    every rank's: the mean of the ranks' means, then the mean of their variances plus their
    means' squared distance to it (equal counts per rank; no E[x²] - E[x]² cancellation).
    """
    bf, c, s = x.shape
    g = norm.num_groups
    view = x.view(batch, frames, g, c // g, s)
    var, mean = torch.var_mean(view, dim=(1, 3, 4), correction=0, keepdim=True)  # (B, 1, G, 1, 1)
    dtype = stats_dtype(x.dtype)  # fp32 statistics, fp64 for fp64 inputs
    var, mean = var.to(dtype), mean.to(dtype)
    if split is not None:
        local = mean
        mean = split.sum(local) / split.size
        var = split.sum(var + (local - mean).square()) / split.size
    scale = torch.rsqrt(var + norm.eps)
    shift = -mean * scale
    if norm.affine:
        weight = norm.weight.to(dtype).view(1, 1, g, c // g, 1)
        scale = scale * weight
        shift = shift * weight + norm.bias.to(dtype).view(1, 1, g, c // g, 1)
    return torch.addcmul(shift.to(x.dtype), view, scale.to(x.dtype)).view(bf, c, s)


def qkv_params(attn: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) of the (3·H·Dh, C) projection the attention's processor uses: ``to_qkv``
    with the fused processor, else to_q, to_k, to_v concatenated (parameter-sized, no renaming)."""
    if DEFAULT_PROCESSORS[type(attn.processor).__name__]:
        return attn.to_qkv.weight, attn.to_qkv.bias
    linears = (attn.to_q, attn.to_k, attn.to_v)
    weight = torch.cat([m.weight for m in linears])
    if all(m.bias is None for m in linears):
        return weight, None
    return weight, torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                              for m in linears])


def temporal_self_attention(attn: nn.Module, x: Tensor, frames: int, backend: str) -> Tensor:
    """diffusers ``Attention`` (default processor, no mask) over the frames of each pixel of
    frame-major x (B, F·S, C): one GEMM to qkv, the fused op reading it in place, to_out."""
    weight, bias = qkv_params(attn)
    # AttnProcessor2_0 lets SDPA use head_dim**-0.5 (None here); AttnProcessor uses attn.scale.
    scale = attn.scale if type(attn.processor).__name__ == "AttnProcessor" else None
    out = temporal_attention(F.linear(x, weight, bias), frames, attn.heads, scale=scale, token_order="time_major",
                             backend=backend)
    return attn.to_out[1](attn.to_out[0](out))


def sinusoidal(pos_embed: nn.Module, x: Tensor, frames: int) -> Tensor:
    """x (B, F·S, C) + the frame's row of a SinusoidalPositionalEmbedding table (upstream adds
    it to (B·S, F, C) sequences: the same sums)."""
    b, length, c = x.shape
    table = pos_embed.pe[0, :frames].view(frames, 1, c)
    return (x.view(b, frames, length // frames, c) + table).view(b, length, c)


def basic_block(block: nn.Module, h: Tensor, frames: int, backend: str, timestep: Tensor | None = None) -> Tensor:
    """``BasicTransformerBlock.forward`` as a temporal block on frame-major h (B, F·S, C), for
    norm_type "layer_norm" (AnimateDiff, text-to-video UNets: optional sinusoidal positions,
    self-attention, optional second self-attention) and "ada_norm_single" (Latte, with
    ``timestep`` (B, 6·C), one row per clip, where upstream repeats it per pixel)."""
    ada = block.norm_type == "ada_norm_single"
    if ada:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            block.scale_shift_table[None] + timestep.reshape(h.shape[0], 6, -1)).chunk(6, dim=1)
        norm = block.norm1(h) * (1 + scale_msa) + shift_msa
    else:
        norm = block.norm1(h)
    if block.pos_embed is not None:
        norm = sinusoidal(block.pos_embed, norm, frames)
    out = temporal_self_attention(block.attn1, norm, frames, backend)
    h = (gate_msa * out if ada else out) + h
    if block.attn2 is not None:  # never with ada_norm_single (Latte's temporal blocks have none)
        norm = block.norm2(h)
        if block.pos_embed is not None:
            norm = sinusoidal(block.pos_embed, norm, frames)
        h = temporal_self_attention(block.attn2, norm, frames, backend) + h
    if ada:
        out = gate_mlp * block.ff(block.norm2(h) * (1 + scale_mlp) + shift_mlp)
    else:
        out = block.ff(block.norm3(h))
    return out + h


def svd_block(block: nn.Module, h: Tensor, frames: int, context: Tensor | None, backend: str) -> Tensor:
    """``TemporalBasicTransformerBlock.forward`` on frame-major h (B, F·S, C).

    ``context`` is upstream's per-pixel time context (B·S, 1, C_ctx) or None. Attention to a
    single key is softmax weight 1 exactly, so the cross-attention is to_out(value(context)) per
    pixel (value: to_v, or the v half of to_kv with the fused processor), added to all its
    frames. Query and key do not reach the output: upstream's norm2, to_q and to_k get exact zero
    gradients (softmax over one key), which ``with_zero_gradients`` gives them here.
    """
    residual = h
    h = block.ff_in(block.norm_in(h))
    if block.is_res:
        h = h + residual
    h = temporal_self_attention(block.attn1, block.norm1(h), frames, backend) + h
    if block.attn2 is not None:
        attn = block.attn2
        if context is None:  # upstream: self-attention through attn2
            h = temporal_self_attention(attn, block.norm2(h), frames, backend) + h
        else:
            b, length, c = h.shape
            fused = DEFAULT_PROCESSORS[type(attn.processor).__name__]
            value = attn.to_kv(context).chunk(2, dim=-1)[1] if fused else attn.to_v(context)
            out = attn.to_out[1](attn.to_out[0](value))  # (B·S, 1, C)
            out = with_zero_gradients(out, (block.norm2, attn.to_q) if fused else (block.norm2, attn.to_q, attn.to_k))
            h = (h.view(b, frames, length // frames, c) + out.view(b, 1, length // frames, c)).view(b, length, c)
    out = block.ff(block.norm3(h))
    return out + h if block.is_res else out
