"""A small stand-in for the official facebookresearch TimeSformer ``vit.py`` structure, written
for these tests from the semantics notes (shared/notes/semantics.md §1): same attribute names,
same constructor arguments, same ``Block.forward(x, B, T, W)``, same maths and the same order
of random draws, in plain torch (no einops).

Tokens: x is (B, 1 + H·W·T, D), cls first, patches space-major (index 1 + n·T + t).
"""
from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Per-sample stochastic depth, drawn with torch.rand like the official helper."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        noise = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        return x.div(keep) * torch.floor(noise + keep)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention over the sequence axis of (batch, seq, dim)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        batch, seq, dim = x.shape
        heads = self.num_heads
        # channels of qkv are (3, heads, head_dim)
        q, k, v = self.qkv(x).view(batch, seq, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)
        weights = self.attn_drop(weights)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, seq, dim)
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.1, act_layer=nn.GELU, norm_layer=nn.LayerNorm, attention_type="divided_space_time"):
        super().__init__()
        assert attention_type in ("divided_space_time", "space_only", "joint_space_time")
        self.attention_type = attention_type
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        if attention_type == "divided_space_time":
            self.temporal_norm1 = norm_layer(dim)
            self.temporal_attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
            self.temporal_fc = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer, drop)

    def forward(self, x, B, T, W):
        H = ((x.shape[1] - 1) // T) // W
        if self.attention_type != "divided_space_time":
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        dim = x.shape[-1]
        patches = x[:, 1:]
        # temporal: one sequence of T frames per (clip, patch); space-major makes this a reshape
        seq = patches.reshape(B * H * W, T, dim)
        res = self.drop_path(self.temporal_attn(self.temporal_norm1(seq)))
        res = self.temporal_fc(res.reshape(B, H * W * T, dim))
        xt = patches + res
        # spatial: one sequence [cls, H·W patches] per (clip, frame)
        cls = x[:, :1]
        frames = xt.reshape(B, H * W, T, dim).transpose(1, 2).reshape(B * T, H * W, dim)
        xs = torch.cat([cls.repeat(1, T, 1).reshape(B * T, 1, dim), frames], dim=1)
        res = self.drop_path(self.attn(self.norm1(xs)))
        cls_res = res[:, 0].reshape(B, T, dim).mean(dim=1, keepdim=True)
        res = res[:, 1:].reshape(B, T, H * W, dim).transpose(1, 2).reshape(B, H * W * T, dim)
        x = torch.cat([cls, xt], dim=1) + torch.cat([cls_res, res], dim=1)
        # MLP
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TinyTimeSformer(nn.Module):
    """Blocks of the official structure on token input, with a stochastic-depth ramp like
    ``VisionTransformer`` (block i gets drop_path_rate·i/(depth-1))."""

    def __init__(self, dim=32, depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=True, qk_scale=None, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.0, attention_type="divided_space_time"):
        super().__init__()
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, rate,
                  norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6), attention_type=attention_type)
            for rate in rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, T, W):
        B = x.shape[0]
        for block in self.blocks:
            x = block(x, B, T, W)
        return self.norm(x)
