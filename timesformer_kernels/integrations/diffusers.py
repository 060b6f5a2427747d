"""Swap-in for the temporal transformers of diffusers' video models.

Matched by class name (any class in the MRO) and structure:

- ``AnimateDiffTransformer3D`` (motion modules of ``UNetMotionModel`` / ``MotionAdapter``) and
  ``TransformerTemporalModel`` (``UNet3DConditionModel``): channel-first input (B·F, C, H, W);
  upstream permutes it to (B·H·W, F, C) and back (two hidden-state copies). Fused: GroupNorm
  over (clip, group) on the input's layout, proj_in / proj_out as batched GEMMs reading and
  writing channel-first through transposed views, the ``BasicTransformerBlock``s (layer_norm,
  sinusoidal positions, one or two temporal self-attentions, feed-forward) on frame-major
  tokens (B, F·H·W, C), each attention one qkv GEMM and the fused op (time_major).
- ``TemporalBasicTransformerBlock`` (``TransformerSpatioTemporalModel``, Stable Video
  Diffusion): upstream permutes (B·F, S, C) to (B·S, F, C) and back; fused in frame-major
  order, its cross-attention to the one-token time context computed exactly as
  to_out(to_v(context)) (softmax over one key is 1). The ``image_only_indicator`` mix and the
  spatial blocks stay upstream's code.
- ``LatteTransformer3DModel``: its forward permutes around every temporal block; the fused
  forward runs the spatial blocks as they are and the temporal blocks (ada_norm_single, the
  temporal positional embedding) on the spatial blocks' frame-major output.

Calls the fused path cannot reproduce run the original forward, with a warning once per
reason: a non-default attention processor (anything but AttnProcessor2_0, AttnProcessor,
FusedAttnProcessor2_0), q/k/v (or proj_in / proj_out) projections that are not plain
``nn.Linear`` (LoRA / peft wrappers) or carry hooks, attention options (group/spatial/q-k
norms, residual connection, output rescale, cross-attention norm, fewer key/value heads),
``cross_attention_kwargs`` or ``encoder_hidden_states`` given to a motion module, feed-forward
chunking, dropout active in training, hooks on a module the fused path does not call (a
temporal block, an Attention, the GroupNorm), a time context of more than one token. The
temporal transformers take no attention mask (Latte's ``encoder_attention_mask`` goes to its
spatial blocks, which run as they are). Shapes upstream rejects run the original, which
raises its own error.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Optional

import torch
from torch import nn

from ._common import active_dropout, bind_arguments, frame_split, original_forward, run_original
from .diffusers_ops import (DEFAULT_PROCESSORS, basic_block, group_norm_clips, linear_from_channels,
                            linear_to_channels, svd_block)

KIND = "diffusers"
_CHANNEL_FIRST = ("AnimateDiffTransformer3D", "TransformerTemporalModel")
_SVD_BLOCK = "TemporalBasicTransformerBlock"
_LATTE = "LatteTransformer3DModel"
_ARGS = {
    "AnimateDiffTransformer3D": ("hidden_states", "encoder_hidden_states", "timestep", "class_labels", "num_frames",
                                 "cross_attention_kwargs"),
    "TransformerTemporalModel": ("hidden_states", "encoder_hidden_states", "timestep", "class_labels", "num_frames",
                                 "cross_attention_kwargs", "return_dict"),
    _SVD_BLOCK: ("hidden_states", "num_frames", "encoder_hidden_states"),
    _LATTE: ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask",
             "enable_temporal_attentions", "return_dict"),
}
_ATTENTION_OPTIONS = ("group_norm", "spatial_norm", "norm_q", "norm_k")
_OUTPUTS = {"TransformerTemporalModel": "TransformerTemporalModelOutput", _LATTE: "Transformer2DModelOutput"}


def _kind(module: nn.Module) -> Optional[type]:
    """The diffusers class in module's MRO this swap-in knows, or None."""
    return next((cls for cls in type(module).__mro__ if cls.__name__ in _ARGS), None)


def _signature(module: nn.Module, cls: type) -> Optional[inspect.Signature]:
    try:
        signature = inspect.signature(type(module).forward)
    except (TypeError, ValueError):
        return None
    return signature if list(signature.parameters)[1:] == list(_ARGS[cls.__name__]) else None


def _is_attention(attn) -> bool:
    return (isinstance(attn, nn.Module) and all(hasattr(attn, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads"))
            and isinstance(attn.to_out, nn.ModuleList) and len(attn.to_out) == 2)


def _is_basic_block(block, norm_type: str) -> bool:
    if type(block).__name__ != "BasicTransformerBlock" or getattr(block, "norm_type", None) != norm_type:
        return False
    if getattr(block, "only_cross_attention", True) or not _is_attention(block.attn1):
        return False
    if block.pos_embed is not None and type(block.pos_embed).__name__ != "SinusoidalPositionalEmbedding":
        return False
    if norm_type == "ada_norm_single" and (block.attn2 is not None or block.pos_embed is not None):
        return False
    return block.attn2 is None or _is_attention(block.attn2)


def matches(module) -> bool:
    cls = _kind(module)
    if cls is None or _signature(module, cls) is None:
        return False
    name = cls.__name__
    if name in _CHANNEL_FIRST:
        return (isinstance(getattr(module, "norm", None), nn.GroupNorm)
                and all(isinstance(getattr(module, p, None), nn.Linear) for p in ("proj_in", "proj_out"))
                and all(_is_basic_block(b, "layer_norm") for b in module.transformer_blocks))
    if name == _SVD_BLOCK:
        return _is_attention(module.attn1) and (module.attn2 is None or _is_attention(module.attn2))
    return (isinstance(getattr(module, "temp_pos_embed", None), torch.Tensor)
            and len(module.transformer_blocks) == len(module.temporal_transformer_blocks)
            and all(_is_basic_block(b, "ada_norm_single") for b in module.temporal_transformer_blocks))


# ------------------------------------------------------------------------------ fallbacks
def _warn(key: str, what: str) -> tuple[str, str]:
    return f"diffusers:{key}", f"timesformer_kernels: diffusers temporal transformer {what}: running the original code"


def _hooked(module: nn.Module) -> bool:
    """Hooks or a replaced forward (accelerate, diffusers' hook registry) that the fused path,
    which does not call ``module``, would skip."""
    return "forward" in module.__dict__ or bool(module._forward_hooks) or bool(module._forward_pre_hooks)


def _plain_linear(linear) -> bool:
    """A linear whose weights the fused path may read directly: nn.Linear's own forward, no hooks."""
    return isinstance(linear, nn.Linear) and type(linear).forward is nn.Linear.forward and not _hooked(linear)


def _attention_reason(attn, self_attention: bool):
    """A warned fallback (key, message) for an attention the fused path cannot reproduce, else None."""
    name = type(attn.processor).__name__
    if name not in DEFAULT_PROCESSORS or not type(attn.processor).__module__.startswith("diffusers"):
        return _warn(f"processor:{name}", f"with attention processor {name} (only diffusers' default processors "
                     "are fused)")
    if _hooked(attn):
        return _warn("attention_hooks", "with hooks on an Attention module")
    options = [o for o in _ATTENTION_OPTIONS if getattr(attn, o, None) is not None]
    if getattr(attn, "residual_connection", False):
        options.append("residual_connection")
    if getattr(attn, "rescale_output_factor", 1.0) != 1.0:
        options.append("rescale_output_factor")
    if getattr(attn, "norm_cross", None) is not None:
        options.append("norm_cross")
    if options:
        return _warn(f"options:{','.join(options)}", f"with attention options {options}")
    if not self_attention:
        return None
    linears = (attn.to_qkv,) if DEFAULT_PROCESSORS[name] else (attn.to_q, attn.to_k, attn.to_v)
    if not all(_plain_linear(m) for m in linears):
        return _warn("projections", "with q/k/v projections that are not plain nn.Linear (LoRA / peft "
                     "adapters) or that carry hooks")
    if len(linears) == 3 and not (attn.to_q.out_features == attn.to_k.out_features == attn.to_v.out_features):
        return _warn("kv_heads", "with fewer key/value heads than query heads")
    return None


def _block_reason(block, attentions: tuple, query_dim: int, bypassed: bool = True):
    """Warned fallback for a temporal block, silent (None, "") where upstream raises, else None.
    ``bypassed``: the fused path does not call the block (so its hooks would not run)."""
    if bypassed and _hooked(block):
        return _warn("block_hooks", f"with hooks on its {type(block).__name__}")
    if getattr(block, "_chunk_size", None) is not None:
        return _warn("chunking", "with feed-forward chunking (set_chunk_feed_forward)")
    if active_dropout(block):
        return _warn("dropout", "in training with dropout > 0 (the masks would be drawn in another token order)")
    for attn, self_attention in attentions:
        if self_attention and attn.to_k.in_features != query_dim:
            return None, ""
        reason = _attention_reason(attn, self_attention)
        if reason is not None:
            return reason
    return None


def _basic_block_attentions(block) -> tuple:
    return ((block.attn1, True),) + (((block.attn2, True),) if block.attn2 is not None else ())


def _channel_first_reason(module, args: dict):
    x, frames = args["hidden_states"], args["num_frames"]
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or isinstance(frames, bool) or not isinstance(frames, int):
        return None, ""
    if frames < 1 or x.shape[0] % frames or x.shape[1] != module.norm.num_channels:
        return None, ""
    if args["encoder_hidden_states"] is not None:
        return _warn("encoder_hidden_states", "called with encoder_hidden_states (cross-attention over pixels)")
    if args["cross_attention_kwargs"]:
        return _warn("cross_attention_kwargs", "called with cross_attention_kwargs")
    if not all(_plain_linear(m) for m in (module.proj_in, module.proj_out)):
        return _warn("proj", "with proj_in / proj_out that are not plain nn.Linear or that carry hooks")
    if _hooked(module.norm):
        return _warn("norm_hooks", "with hooks on its GroupNorm")
    split = frame_split(module)
    for block in module.transformer_blocks:
        if block.pos_embed is not None and frames * (split.size if split else 1) > block.pos_embed.pe.shape[1]:
            return None, ""
        reason = _block_reason(block, _basic_block_attentions(block), module.proj_in.out_features)
        if reason is not None:
            return reason
    return None


def _svd_reason(block, args: dict):
    x, frames, context = args["hidden_states"], args["num_frames"], args["encoder_hidden_states"]
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or isinstance(frames, bool) or not isinstance(frames, int):
        return None, ""
    if frames < 1 or x.shape[0] % frames:
        return None, ""
    attentions = [(block.attn1, True)]
    if block.attn2 is not None:
        if context is None:
            attentions.append((block.attn2, True))
        elif not isinstance(context, torch.Tensor) or context.dim() != 3:
            return None, ""
        elif context.shape[1] != 1:
            return _warn("context_tokens", f"with a time context of {context.shape[1]} tokens (fused: one)")
        elif context.shape[0] != x.shape[0] // frames * x.shape[1]:
            return None, ""
        else:
            attentions.append((block.attn2, False))
    return _block_reason(block, tuple(attentions), block.norm1.normalized_shape[0], bypassed=False)


def _latte_reason(model, args: dict):
    x = args["hidden_states"]
    if not args["enable_temporal_attentions"]:
        return None, ""  # nothing temporal to fuse
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        return None, ""
    if x.shape[2] > 1 and model.temp_pos_embed.shape[1] != x.shape[2]:
        return None, ""
    for block in model.temporal_transformer_blocks:
        reason = _block_reason(block, _basic_block_attentions(block), block.norm1.normalized_shape[0])
        if reason is not None:
            return reason
    return None


# --------------------------------------------------------------------------- fused forwards
def _channel_first(module, args: dict, backend: str) -> torch.Tensor:
    x, frames = args["hidden_states"], args["num_frames"]
    bf, c, height, width = x.shape
    batch, pixels = bf // frames, height * width
    split = frame_split(module)
    flat = x.reshape(bf, c, pixels)
    h = linear_from_channels(group_norm_clips(flat, batch, frames, module.norm, split), module.proj_in)
    h = h.view(batch, frames * pixels, h.shape[-1])
    if split is not None:  # every layer of the blocks is per pixel but the attention: all run on the pixel split
        h, frames = split.to_patch_split(h, frames, "time_major"), frames * split.size
    for block in module.transformer_blocks:
        h = basic_block(block, h, frames, backend)
    if split is not None:
        h = split.to_frame_split(h, batch, pixels, "time_major")
    out = linear_to_channels(h.view(bf, pixels, h.shape[-1]), module.proj_out)
    return (out + flat).view(bf, c, height, width)


def _svd(block, args: dict, backend: str) -> torch.Tensor:
    x, frames = args["hidden_states"], args["num_frames"]
    bf, s, c = x.shape
    h = svd_block(block, x.reshape(bf // frames, frames * s, c), frames, args["encoder_hidden_states"], backend)
    return h.view(bf, s, h.shape[-1])


def _latte(model, args: dict, backend: str):
    """LatteTransformer3DModel.forward with the temporal blocks on frame-major tokens."""
    x, timestep, text = args["hidden_states"], args["timestep"], args["encoder_hidden_states"]
    config = model.config
    batch, channels, frames, height, width = x.shape
    hidden = x.permute(0, 2, 1, 3, 4).reshape(-1, channels, height, width)
    height, width = height // config.patch_size, width // config.patch_size
    hidden = model.pos_embed(hidden)
    timestep, embedded_timestep = model.adaln_single(
        timestep, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, batch_size=batch,
        hidden_dtype=hidden.dtype)
    text = model.caption_projection(text)
    text = text.repeat_interleave(frames, dim=0, output_size=text.shape[0] * frames).view(-1, *text.shape[-2:])
    timestep_spatial = timestep.repeat_interleave(frames, dim=0, output_size=timestep.shape[0] * frames)
    checkpointing = torch.is_grad_enabled() and model.gradient_checkpointing
    for i, (spatial, temporal) in enumerate(zip(model.transformer_blocks, model.temporal_transformer_blocks)):
        spatial_args = (hidden, None, text, args["encoder_attention_mask"], timestep_spatial, None, None)
        hidden = model._gradient_checkpointing_func(spatial, *spatial_args) if checkpointing else spatial(*spatial_args)
        tokens, dim = hidden.shape[1], hidden.shape[2]
        h = hidden.reshape(batch, frames * tokens, dim)
        if i == 0 and frames > 1:
            table = model.temp_pos_embed.to(h.dtype).view(frames, 1, dim)
            h = (h.view(batch, frames, tokens, dim) + table).view(h.shape)
        if checkpointing:
            h = model._gradient_checkpointing_func(basic_block, temporal, h, frames, backend, timestep)
        else:
            h = basic_block(temporal, h, frames, backend, timestep)
        hidden = h.view(batch * frames, tokens, dim)
    embedded_timestep = embedded_timestep.repeat_interleave(
        frames, dim=0, output_size=embedded_timestep.shape[0] * frames).view(-1, embedded_timestep.shape[-1])
    shift, scale = (model.scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
    hidden = model.proj_out(model.norm_out(hidden) * (1 + scale) + shift)
    p = config.patch_size
    hidden = hidden.reshape(-1, height, width, p, p, model.out_channels)
    hidden = torch.einsum("nhwpqc->nchpwq", hidden)
    out = hidden.reshape(-1, model.out_channels, height * p, width * p)
    return out.reshape(batch, -1, *out.shape[-3:]).permute(0, 2, 1, 3, 4)


def _output_class(module, name: str):
    """The output dataclass ``name`` from the diffusers source file that defines module's class."""
    return getattr(importlib.import_module(_kind(module).__module__), name)


def fused_forward(module, backend: str):
    cls = _kind(module)
    name = cls.__name__
    signature = _signature(module, cls)
    if name in _CHANNEL_FIRST:
        reason, run = _channel_first_reason, _channel_first
    elif name == _SVD_BLOCK:
        reason, run = _svd_reason, _svd
    else:
        reason, run = _latte_reason, _latte

    def forward(self, *args, **kwargs):
        arguments = bind_arguments(signature, self, args, kwargs)
        if arguments is None:
            return original_forward(self)(*args, **kwargs)  # raises the original's own error
        fallback = reason(self, arguments)
        if fallback is not None:
            return run_original(self, *fallback, args, kwargs)
        out = run(self, arguments, backend)
        if name not in _OUTPUTS:
            return out
        return _output_class(self, _OUTPUTS[name])(sample=out) if arguments["return_dict"] else (out,)

    return forward
