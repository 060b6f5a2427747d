"""nn.Modules of divided space-time attention built on the fused ops.

Parameter names follow the official TimeSformer ``Block`` (temporal_norm1, temporal_attn.qkv,
temporal_attn.proj, temporal_fc, norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2), so a
block of an official checkpoint loads with ``load_state_dict`` without renaming.

Drop-path draws the same random shapes in the same order as the official/Hugging Face code
(per (clip, patch) in the temporal branch, per (clip, frame) in the spatial branch, per clip
in the MLP), so under the same seed a fused block reproduces the original one exactly.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .ops import spatial_attention, temporal_attention
from .parallel import FrameSplit
from .validation import check_int


def drop_path_mask(x: Tensor, batch: int, prob: float, training: bool) -> Optional[Tensor]:
    """(batch,) keep mask scaled by 1/keep, drawn like timm's DropPath on a batch of ``batch``
    samples; None when drop-path is off."""
    if prob == 0.0 or not training:
        return None
    keep = 1.0 - prob
    return (keep + torch.rand((batch, 1, 1), dtype=x.dtype, device=x.device)).floor_().div_(keep).view(batch)


def _patch_mask(mask: Tensor, b: int, n: int, t: int, per: str, token_order: str) -> Tensor:
    """Broadcast a per-(clip, patch) or per-(clip, frame) mask over (B, N·T, 1) in token order."""
    shape = (b, n, 1) if per == "patch" else (b, 1, t)
    mask = mask.view(shape)
    if token_order == "time_major":
        mask = mask.transpose(1, 2)
    return mask.expand(b, *((n, t) if token_order == "space_major" else (t, n))).reshape(b, n * t, 1)


def temporal_residual(x: Tensor, num_frames: int, num_heads: int, norm: nn.Module, qkv: nn.Module,
                      proj: nn.Module, fc: Optional[nn.Module], drop_prob: float, training: bool,
                      token_order: str = "space_major", backend: str = "auto",
                      scale: Optional[float] = None, split: Optional[FrameSplit] = None) -> Tensor:
    """Patch tokens after the temporal branch: x[:, 1:] + fc(drop_path(proj(attn(norm(x))))).

    With a ``split``, x holds this rank's ``num_frames`` frames of each clip, and the whole branch
    (every layer of it is per token but the attention) runs on the patch split, all frames of this
    rank's patches: two all-to-alls of x's D channels, not one of q, k, v (3·D) and one of the output.
    """
    b = x.shape[0]
    if split is None:
        # norm and qkv are per token: run them on the whole sequence once and pass qkv[:, 1:] as a view.
        tokens, frames, order = qkv(norm(x))[:, 1:], num_frames, token_order
    else:
        tokens = qkv(norm(split.to_patch_split(x[:, 1:], num_frames, token_order)))
        frames, order = num_frames * split.size, "time_major"
    res = proj(temporal_attention(tokens, frames, num_heads, scale=scale, token_order=order, backend=backend))
    n = (x.shape[1] - 1) // num_frames  # after the op has validated num_frames
    # drawn in the branch's dtype, like upstream's drop_path(branch) (differs from x's under autocast)
    mask = drop_path_mask(res, b * n, drop_prob, training)
    if mask is not None:
        batch, columns = b, n
        if split is not None:  # the patch split's columns: every clip's patches [start, stop), time-major
            start, stop = split.patch_range(n)
            mask, batch, columns = mask.view(b, n)[:, start:stop].reshape(-1), 1, b * (stop - start)
        res = res * _patch_mask(mask, batch, columns, frames, "patch", order)
    if fc is not None:
        res = fc(res)
    if split is not None:
        res = split.to_frame_split(res, b, n, token_order)
    return x[:, 1:] + res


def spatial_residual(x: Tensor, num_frames: int, num_heads: int, norm: nn.Module, qkv: nn.Module,
                     proj: nn.Module, drop_prob: float, training: bool, token_order: str = "space_major",
                     backend: str = "auto", scale: Optional[float] = None,
                     split: Optional[FrameSplit] = None) -> Tensor:
    """x + the spatial branch, with the cls output averaged over the frame groups.

    With a ``split``, x holds this rank's ``num_frames`` frames: drop-path draws the masks of all
    frames (upstream's draw) and keeps this rank's, and the cls output's mean over all frames is
    the sum over the ranks of their frames' sums."""
    out, cls_out = spatial_attention(qkv(norm(x)), num_frames, num_heads, scale=scale, token_order=token_order,
                                     backend=backend)
    b, n = x.shape[0], out.shape[1] // num_frames  # after the op has validated num_frames
    res, cls_res = proj(out), proj(cls_out)
    frames = num_frames if split is None else num_frames * split.size
    mask = drop_path_mask(res, b * frames, drop_prob, training)
    if mask is not None:
        if split is not None:
            mask = split.shard(mask.view(b, frames), 1).reshape(-1)
        res = res * _patch_mask(mask, b, n, num_frames, "frame", token_order)
        cls_res = cls_res * mask.view(b, num_frames, 1)
    if split is None:
        cls_res = cls_res.mean(1, keepdim=True)
    else:
        cls_res = split.sum(cls_res.sum(1, keepdim=True)) / frames
    return x + torch.cat([cls_res, res], dim=1)


def mlp_residual(x: Tensor, norm: nn.Module, mlp, drop_prob: float, training: bool) -> Tensor:
    """x + drop_path(mlp(norm(x))), the mask drawn per clip in the branch's dtype (like upstream)."""
    res = mlp(norm(x))
    mask = drop_path_mask(res, x.shape[0], drop_prob, training)
    return x + (res if mask is None else res * mask.view(-1, 1, 1))


def _check_heads(dim: int, num_heads: int) -> None:
    if dim % check_int("num_heads", num_heads):
        raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")


class DividedTemporalAttention(nn.Module):
    """qkv Linear -> temporal attention over each patch's T frames -> proj Linear.

    Input (B, N·T, D) (or (B, 1 + N·T, D) with ``with_cls``), output (B, N·T, D).
    Same parameters as the official ``Attention`` (qkv, proj).
    """

    def __init__(self, dim: int, num_heads: int, num_frames: int, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, token_order: str = "space_major", with_cls: bool = False,
                 backend: str = "auto"):
        super().__init__()
        _check_heads(dim, num_heads)
        self.num_heads, self.num_frames, self.scale = num_heads, num_frames, qk_scale
        self.token_order, self.with_cls, self.backend = token_order, with_cls, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        out = temporal_attention(self.qkv(x), self.num_frames, self.num_heads, scale=self.scale,
                                 token_order=self.token_order, with_cls=self.with_cls, backend=self.backend)
        return self.proj(out)


class DividedSpatialAttention(nn.Module):
    """qkv Linear -> attention within each frame over [cls, N patches] -> proj Linear.

    Input (B, 1 + N·T, D); returns (patch outputs (B, N·T, D), per-frame cls outputs (B, T, D)).
    """

    def __init__(self, dim: int, num_heads: int, num_frames: int, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, token_order: str = "space_major", backend: str = "auto"):
        super().__init__()
        _check_heads(dim, num_heads)
        self.num_heads, self.num_frames, self.scale = num_heads, num_frames, qk_scale
        self.token_order, self.backend = token_order, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out, cls_out = spatial_attention(self.qkv(x), self.num_frames, self.num_heads, scale=self.scale,
                                         token_order=self.token_order, backend=self.backend)
        return self.proj(out), self.proj(cls_out)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2, named like the official checkpoint."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DividedSpaceTimeBlock(nn.Module):
    """One TimeSformer block with divided space-time attention, fused; loads official weights.

    Input and output (B, 1 + N·T, D), cls first, patches in ``token_order``. ``norm_eps``
    defaults to 1e-6 like the released TimeSformer models.
    """

    def __init__(self, dim: int, num_heads: int, num_frames: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, qk_scale: Optional[float] = None, drop_path: float = 0.0,
                 norm_eps: float = 1e-6, token_order: str = "space_major", backend: str = "auto"):
        super().__init__()
        self.num_heads, self.num_frames, self.drop_path = num_heads, num_frames, float(drop_path)
        self.token_order, self.backend, self.scale = token_order, backend, qk_scale
        common = dict(token_order=token_order, backend=backend)
        self.temporal_norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.temporal_attn = DividedTemporalAttention(dim, num_heads, num_frames, qkv_bias, qk_scale, **common)
        self.temporal_fc = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = DividedSpatialAttention(dim, num_heads, num_frames, qkv_bias, qk_scale, **common)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        common = dict(token_order=self.token_order, backend=self.backend, scale=self.scale)
        xt = temporal_residual(x, self.num_frames, self.num_heads, self.temporal_norm1, self.temporal_attn.qkv,
                               self.temporal_attn.proj, self.temporal_fc, self.drop_path, self.training, **common)
        x = spatial_residual(torch.cat([x[:, :1], xt], dim=1), self.num_frames, self.num_heads, self.norm1,
                             self.attn.qkv, self.attn.proj, self.drop_path, self.training, **common)
        return mlp_residual(x, self.norm2, self.mlp, self.drop_path, self.training)
