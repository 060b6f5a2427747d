"""Every provider of the two ops: ours (timesformer_kernels' backends) and the unfused peers.

All providers compute the same function from the same input and return the same outputs, so
the harness can check each against one reference and time them interchangeably:

    temporal  input qkv[:, 1:]    (B, N·T, 3·D), patch rows of the qkv projection (a strided
                                  view: row 0 of qkv, the cls token, takes no part)
              output (out,)       out (B, N·T, D), space-major like the input
    spatial   input qkv           (B, 1 + N·T, 3·D), cls token at row 0
              output (out, cls_out)  out (B, N·T, D); cls_out (B, T, D), the cls query's output in
                                  each frame group (the model averages it over frames after
                                  its projection, outside the op)

qkv's last dim is (3, H, Dh). Patches are space-major (row 1 + n·T + t), the order of the
official and Hugging Face TimeSformer.

Providers:
    triton, cuda, torch   ours: ``timesformer_kernels.temporal_attention`` /
                          ``spatial_attention`` with that backend, reading qkv in place
    hf_eager              what Hugging Face's TimeSformer runs: reshape/permute into groups,
                          matmul, softmax, matmul, reshape back. The softmax runs in float32
                          and its probabilities are cast back, as under bf16/fp16 autocast,
                          the way the model is trained and served.
    sdpa                  the best unfused PyTorch: the same rearranges around
                          F.scaled_dot_product_attention (PyTorch picks flash, mem-efficient
                          or cuDNN)
    compiled              torch.compile of hf_eager (default mode, static shapes)
    flex                  FlexAttention over the original token order, no rearranges: a
                          block-diagonal mask (temporal: tokens n·T..n·T+T-1 form a group;
                          spatial: tokens of one frame plus the cls key). Spatial needs one
                          output per (cls, frame) pair, which one cls query row cannot give,
                          so the cls rows are a second, tiny flex call with T query rows.
    flash_attn            flash-attn's varlen kernel over the groups (temporal; spatial uses
                          its packed kernel on the rearranged groups), when importable
    xformers              memory_efficient_attention with a BlockDiagonalMask, when importable

A note on fairness: the peers rearrange qkv (3·D wide) into groups, while inside the
Hugging Face model the spatial rearrange happens on the hidden states (D wide) before the
LayerNorm and qkv Linear. The microbenchmark therefore charges the spatial peers up to
2·2·D more bytes per token than the model does; the end-to-end benchmark has no such bias.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import Shape

Fn = Callable[[Tensor], tuple]

OURS = ("triton", "cuda")
ALL = ("triton", "cuda", "torch", "hf_eager", "sdpa", "compiled", "flex", "flash_attn", "xformers")
DEFAULT_GPU = ("triton", "cuda", "hf_eager", "sdpa", "compiled", "flex", "flash_attn", "xformers")
DEFAULT_SMOKE = ("torch", "hf_eager", "sdpa", "triton")
COMPILING = ("compiled", "flex")  # providers whose first call compiles (tens of seconds on GPU)


class Unavailable(Exception):
    """Raised by ``build`` when a provider cannot run here; the message says why."""


# ---------------------------------------------------------------------- ours
def _ours(backend: str, op: str, shape: Shape) -> Fn:
    import timesformer_kernels as tk

    t, h = shape.frames, shape.heads
    if op == "temporal":
        return lambda x: (tk.temporal_attention(x, t, h, backend=backend),)
    return lambda x: tuple(tk.spatial_attention(x, t, h, backend=backend))


def _why_not_ours(backend: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    reasons = []
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            reasons.append("triton is not installed")
        elif device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET", "0") != "1":
                reasons.append("Triton on CPU tensors needs TRITON_INTERPRET=1 before triton is imported")
            elif dtype == torch.bfloat16:
                reasons.append("bf16 tl.dot is unreliable in the Triton interpreter (CPU); measure bf16 on a GPU")
    elif backend == "cuda":
        from .timing import cuda_extension_available

        if device.type != "cuda":
            reasons.append("the CUDA extension needs a CUDA device")
        elif not cuda_extension_available():
            reasons.append("timesformer_kernels' CUDA extension is not built (timesformer_kernels.cuda.available() "
                           "is False; install with CUDA_HOME set)")
    return reasons


# ------------------------------------------------------------ rearranges (the peers')
def _group_temporal(x: Tensor, shape: Shape) -> Tensor:
    """(B, N·T, C) patch rows -> (B·N, T, C): each patch's T frames (a copy when x is strided)."""
    return x.reshape(shape.batch * shape.patches, shape.frames, x.shape[-1])


def _ungroup_temporal(o: Tensor, shape: Shape) -> tuple:
    return (o.reshape(shape.batch, shape.patches * shape.frames, o.shape[-1]),)


def _group_spatial(x: Tensor, shape: Shape) -> Tensor:
    """(B, 1 + N·T, C) -> (B·T, 1 + N, C): per frame, [cls, the frame's N patches], as the
    Hugging Face layer builds it (cls repeated T times, patches permuted frame-major)."""
    b, t, n, c = shape.batch, shape.frames, shape.patches, x.shape[-1]
    cls = x[:, :1].repeat(1, t, 1).reshape(b * t, 1, c)
    patches = x[:, 1:].reshape(b, n, t, c).permute(0, 2, 1, 3).reshape(b * t, n, c)
    return torch.cat([cls, patches], dim=1)


def _ungroup_spatial(o: Tensor, shape: Shape) -> tuple:
    """(B·T, 1 + N, D) -> (out (B, N·T, D) space-major, cls_out (B, T, D))."""
    b, t, n, d = shape.batch, shape.frames, shape.patches, o.shape[-1]
    cls_out = o[:, 0].reshape(b, t, d)
    out = o[:, 1:].reshape(b, t, n, d).permute(0, 2, 1, 3).reshape(b, n * t, d)
    return out, cls_out


def _grouped(attend: Callable[[Tensor], Tensor], op: str, shape: Shape) -> Fn:
    """Wrap an attention over (groups, S, 3·D) -> (groups, S, D) with the op's rearranges."""
    if op == "temporal":
        return lambda x: _ungroup_temporal(attend(_group_temporal(x, shape)), shape)
    return lambda x: _ungroup_spatial(attend(_group_spatial(x, shape)), shape)


# -------------------------------------------------------------------------- hf_eager
def _eager_attention(x: Tensor, heads: int, scale: float) -> Tensor:
    """(G, S, 3·H·Dh) -> (G, S, H·Dh): per head softmax(q·kᵀ·scale)·v with explicit matmuls."""
    g, s, c = x.shape
    dh = c // (3 * heads)
    q, k, v = x.reshape(g, s, 3, heads, dh).permute(2, 0, 3, 1, 4).unbind(0)  # (G, H, S, Dh) each
    scores = (q @ k.transpose(-2, -1)) * scale
    # Under autocast the softmax runs in (at least) float32 and the next matmul casts back: same here.
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
    return (probs @ v).transpose(1, 2).reshape(g, s, heads * dh)


def _hf_eager(op: str, shape: Shape) -> Fn:
    attend = functools.partial(_eager_attention, heads=shape.heads, scale=shape.head_dim ** -0.5)
    return _grouped(attend, op, shape)


# ------------------------------------------------------------------------------ sdpa
def _sdpa_attention(x: Tensor, heads: int, scale: float) -> Tensor:
    g, s, c = x.shape
    dh = c // (3 * heads)
    q, k, v = x.view(g, s, 3, heads, dh).unbind(2)  # (G, S, H, Dh) views, unit last stride
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return o.transpose(1, 2).reshape(g, s, heads * dh)


def _sdpa(op: str, shape: Shape) -> Fn:
    attend = functools.partial(_sdpa_attention, heads=shape.heads, scale=shape.head_dim ** -0.5)
    return _grouped(attend, op, shape)


# -------------------------------------------------------------------------- compiled
def _compiled(op: str, shape: Shape) -> Fn:
    return torch.compile(_hf_eager(op, shape), dynamic=False)


# ------------------------------------------------------------------------------ flex
def _flex(op: str, shape: Shape, device: torch.device) -> Fn:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise Unavailable(f"FlexAttention is not in this torch ({torch.__version__}): {e}") from e
    # Compiled flex is the fused kernel; eager flex is a reference loop, used on CPU only (smoke).
    attend = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
    b, t, n, h, dh = shape.batch, shape.frames, shape.patches, shape.heads, shape.head_dim
    p, scale = n * t, dh ** -0.5

    def heads_view(x: Tensor, which: int) -> Tensor:
        """(B, L, 3·D) -> q, k or v as (B, H, L, Dh), a strided view of x."""
        return x.unflatten(-1, (3, h, dh)).select(2, which).transpose(1, 2)

    def merge(o: Tensor) -> Tensor:
        return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], h * dh)

    if op == "temporal":
        def same_patch(b_, h_, q_idx, kv_idx):
            return q_idx // t == kv_idx // t  # space-major: patch n owns rows n·T .. n·T + T - 1

        mask = create_block_mask(same_patch, None, None, p, p, device=device)

        def run(x: Tensor) -> tuple:
            q, k, v = (heads_view(x, i) for i in range(3))
            return (merge(attend(q, k, v, block_mask=mask, scale=scale)),)
        return run

    def patch_keys(b_, h_, q_idx, kv_idx):
        # query = patch row q_idx (frame q_idx % T); key rows: cls (0) and patches of the same frame
        return (kv_idx == 0) | ((kv_idx - 1) % t == q_idx % t)

    def cls_keys(b_, h_, q_idx, kv_idx):
        # query q_idx = the cls query of frame q_idx
        return (kv_idx == 0) | ((kv_idx - 1) % t == q_idx)

    patch_mask = create_block_mask(patch_keys, None, None, p, 1 + p, device=device)
    cls_mask = create_block_mask(cls_keys, None, None, t, 1 + p, device=device)

    def run(x: Tensor) -> tuple:
        k, v = heads_view(x, 1), heads_view(x, 2)
        q_patch = heads_view(x[:, 1:], 0)
        q_cls = heads_view(x[:, :1], 0).expand(b, h, t, dh).contiguous()
        out = attend(q_patch, k, v, block_mask=patch_mask, scale=scale)
        cls_out = attend(q_cls, k, v, block_mask=cls_mask, scale=scale)
        return merge(out), merge(cls_out)
    return run


# ------------------------------------------------------------------------ flash_attn
def _flash_attn(op: str, shape: Shape) -> Fn:
    try:
        import flash_attn
    except Exception as e:  # noqa: BLE001 - import of a compiled package can fail many ways
        raise Unavailable(f"flash_attn is not importable: {e}") from e
    b, t, n, h, dh = shape.batch, shape.frames, shape.patches, shape.heads, shape.head_dim
    scale = dh ** -0.5
    if op == "temporal":
        # Groups are contiguous runs of T rows: varlen over cu_seqlens = 0, T, 2T, ... (B·N groups).
        cache: dict = {}

        def run(x: Tensor) -> tuple:
            total = b * n * t
            if x.device not in cache:
                cache[x.device] = torch.arange(0, total + 1, t, dtype=torch.int32, device=x.device)
            packed = x.reshape(total, 3, h, dh)
            o = flash_attn.flash_attn_varlen_qkvpacked_func(packed, cache[x.device], t, softmax_scale=scale)
            return (o.reshape(b, n * t, h * dh),)
        return run

    def attend(x: Tensor) -> Tensor:  # (B·T, 1 + N, 3·D): equal lengths, the dense packed kernel
        g, s, _ = x.shape
        o = flash_attn.flash_attn_qkvpacked_func(x.view(g, s, 3, h, dh), softmax_scale=scale)
        return o.reshape(g, s, h * dh)
    return _grouped(attend, op, shape)


# -------------------------------------------------------------------------- xformers
def _xformers(op: str, shape: Shape) -> Fn:
    try:
        import xformers.ops as xops
        from xformers.ops import fmha
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"xformers is not importable: {e}") from e
    b, t, n, h, dh = shape.batch, shape.frames, shape.patches, shape.heads, shape.head_dim
    scale = dh ** -0.5
    if op == "temporal":
        bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens([t] * (b * n))

        def run(x: Tensor) -> tuple:
            packed = x.reshape(1, b * n * t, 3, h, dh)
            q, k, v = packed.unbind(2)
            o = xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)
            return (o.reshape(b, n * t, h * dh),)
        return run

    def attend(x: Tensor) -> Tensor:
        g, s, _ = x.shape
        q, k, v = x.view(g, s, 3, h, dh).unbind(2)
        return xops.memory_efficient_attention(q, k, v, scale=scale).reshape(g, s, h * dh)
    return _grouped(attend, op, shape)


# --------------------------------------------------------------------------- registry
def why_not(name: str, op: str, shape: Shape, device: torch.device, dtype: torch.dtype,
            modes: tuple = ("fwd",)) -> list[str]:
    """Reasons provider ``name`` cannot run here (cheap, before building); empty if it may."""
    if name in ("triton", "cuda"):
        return _why_not_ours(name, device, dtype)
    if name in ("flash_attn", "xformers"):
        module = "flash_attn" if name == "flash_attn" else "xformers"
        if importlib.util.find_spec(module) is None:
            return [f"{module} is not installed"]
        if device.type != "cuda":
            return [f"{module} needs a CUDA device"]
        if name == "flash_attn" and dtype not in (torch.float16, torch.bfloat16):
            return ["flash_attn runs fp16 and bf16 only"]
    if name == "compiled" and device.type == "cpu" and os.environ.get("TK_BENCH_ALLOW_CPU_COMPILE") != "1":
        return ["torch.compile on CPU takes minutes of C++ compilation (set TK_BENCH_ALLOW_CPU_COMPILE=1)"]
    if name == "flex":
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return [f"FlexAttention is not in this torch ({torch.__version__})"]
        if device.type == "cpu" and any(m != "fwd" for m in modes):
            return ["FlexAttention has no backward on CPU (run with --modes fwd)"]
    return []


def build(name: str, op: str, shape: Shape, device: torch.device) -> Fn:
    """The provider's function of the op input (module docstring); raises Unavailable."""
    if name in ("triton", "cuda", "torch"):
        return _ours(name, op, shape)
    if name == "hf_eager":
        return _hf_eager(op, shape)
    if name == "sdpa":
        return _sdpa(op, shape)
    if name == "compiled":
        return _compiled(op, shape)
    if name == "flex":
        return _flex(op, shape, device)
    if name == "flash_attn":
        return _flash_attn(op, shape)
    if name == "xformers":
        return _xformers(op, shape)
    raise ValueError(f"unknown provider {name!r} (known: {', '.join(ALL)})")


def parse(spec: str) -> list[str]:
    names = []
    for p in spec.split(","):
        p = p.strip()
        if p in ("", "all"):
            if p == "all":
                names.extend(n for n in ALL if n not in names)
            continue
        if p not in ALL:
            raise ValueError(f"--providers: unknown provider {p!r} (known: {', '.join(ALL)})")
        if p not in names:
            names.append(p)
    return names
