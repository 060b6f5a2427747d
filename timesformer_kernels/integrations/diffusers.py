"""Swap-in for the temporal transformers of diffusers' video models.

Matched by class name (any class in the MRO) and forward signature:

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

Matched by class (``matches``); what the module holds is checked at every call
(``unsupported``): temporal blocks that are not ``BasicTransformerBlock`` (FreeNoise's
``FreeNoiseTransformerBlock``, split inference's ``SplitInferenceModule``) fall back like the
rest. Calls the fused path cannot reproduce run the original forward, with a warning once per
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

import sys
from typing import Optional

import torch
from torch import nn

from ._common import active_dropout, bind_arguments, class_named, has_attributes, hooked, signature_of
from .diffusers_ops import (DEFAULT_PROCESSORS, basic_block, group_norm_clips, linear_from_channels,
                            linear_to_channels, svd_block)

KIND = "diffusers"
CPU_AUTO = "original"  # backend "auto" on CPU tensors; the fused torch path measured slower (README)
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
_NAMES = tuple(_ARGS)
_ATTENTION_OPTIONS = ("group_norm", "spatial_norm", "norm_q", "norm_k")
_OUTPUTS = {"TransformerTemporalModel": "TransformerTemporalModelOutput", _LATTE: "Transformer2DModelOutput"}


def _kind(module: nn.Module) -> Optional[type]:
    """The diffusers class in module's MRO this swap-in knows, or None."""
    return class_named(module, _NAMES)


def _signature(module: nn.Module, cls: type):
    signature = signature_of(type(module).forward)
    return signature if signature is not None and list(signature.parameters)[1:] == list(_ARGS[cls.__name__]) else None


def matches(module) -> bool:
    """A temporal transformer class this swap-in knows, with its forward's signature. What it
    holds (blocks, processors, projections) is checked at every call: ``unsupported``."""
    cls = _kind(module)
    return cls is not None and _signature(module, cls) is not None


# ------------------------------------------------------------------------------ fallbacks
def _warn(key: str, what: str) -> tuple[str, str]:
    return f"diffusers:{key}", f"timesformer_kernels: diffusers temporal transformer {what}: running the original code"


def _is_attention(attn) -> bool:
    return (isinstance(attn, nn.Module) and has_attributes(attn, ("to_q", "to_k", "to_v", "to_out", "heads"))
            and isinstance(attn.to_out, nn.ModuleList) and len(attn.to_out) == 2)


def _plain_linear(linear) -> bool:
    """A linear whose weights the fused path may read directly: nn.Linear's own forward, no hooks."""
    return isinstance(linear, nn.Linear) and type(linear).forward is nn.Linear.forward and not hooked(linear)


def _attention_reason(attn, projections: bool):
    """A warned fallback (key, message) for an attention the fused path cannot reproduce, else
    None; ``projections``: the fused path reads its q/k/v weights (self-attention)."""
    if not _is_attention(attn):
        return _warn(f"attention:{type(attn).__name__}", f"with attention module {type(attn).__name__}")
    name = type(attn.processor).__name__
    if name not in DEFAULT_PROCESSORS or not type(attn.processor).__module__.startswith("diffusers"):
        return _warn(f"processor:{name}", f"with attention processor {name} (only diffusers' default processors "
                     "are fused)")
    if hooked(attn):
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
    if not projections:
        return None
    linears = (attn.to_qkv,) if DEFAULT_PROCESSORS[name] else (attn.to_q, attn.to_k, attn.to_v)
    if not all(_plain_linear(m) for m in linears):
        return _warn("projections", "with q/k/v projections that are not plain nn.Linear (LoRA / peft "
                     "adapters) or that carry hooks")
    if len(linears) == 3 and not (attn.to_q.out_features == attn.to_k.out_features == attn.to_v.out_features):
        return _warn("kv_heads", "with fewer key/value heads than query heads")
    return None


def _block_reason(block, attentions: tuple, bypassed: bool = True):
    """Warned fallback for a temporal block, else None. ``attentions``: (attention, projections
    read); ``bypassed``: the fused path does not call the block (so its hooks would not run)."""
    if bypassed and hooked(block):
        return _warn("block_hooks", f"with hooks on its {type(block).__name__}")
    if getattr(block, "_chunk_size", None) is not None:
        return _warn("chunking", "with feed-forward chunking (set_chunk_feed_forward, enable_forward_chunking)")
    for attn, projections in attentions:
        reason = _attention_reason(attn, projections)
        if reason is not None:
            return reason
    return None


def _self_attentions(block) -> tuple:
    return (block.attn1,) + ((block.attn2,) if block.attn2 is not None else ())


def _call_reason(blocks, query_dim: int):
    """Per call, after the arguments: silent (None, "") where upstream raises (a self-attention
    whose key dim is not the hidden size), the dropout fallback, else None."""
    if any(attn.to_k.in_features != query_dim for block in blocks for attn in _self_attentions(block)):
        return None, ""
    return _dropout_reason(blocks)


def _dropout_reason(blocks):
    if active_dropout(*blocks):
        return _warn("dropout", "in training with dropout > 0 (the masks would be drawn in another token order)")
    return None


def _basic_block_reason(block, norm_type: str):
    """The checks of ``_block_reason`` for a ``BasicTransformerBlock`` used as a temporal block
    (norm type, one or two self-attentions, sinusoidal positions), after its class: FreeNoise
    and split inference replace the blocks by other modules."""
    name = type(block).__name__
    if name != "BasicTransformerBlock":
        return _warn(f"block:{name}", f"with a {name} in its temporal blocks (FreeNoise, split inference or "
                     "another block: only diffusers' BasicTransformerBlock is fused)")
    if getattr(block, "norm_type", None) != norm_type or getattr(block, "only_cross_attention", True):
        return _warn("block_options", "with a BasicTransformerBlock of another norm type or cross-attention only")
    pos = block.pos_embed
    if pos is not None and (type(pos).__name__ != "SinusoidalPositionalEmbedding" or norm_type == "ada_norm_single"):
        return _warn("positions", f"with positional embedding {type(pos).__name__}")
    if norm_type == "ada_norm_single" and block.attn2 is not None:
        return _warn("block_options", "with a second attention in an ada_norm_single block")
    return _block_reason(block, tuple((attn, True) for attn in _self_attentions(block)))


def _channel_first_unsupported(module):
    if not isinstance(getattr(module, "norm", None), nn.GroupNorm) or hooked(module.norm):
        return _warn("norm", "with a norm that is not an nn.GroupNorm without hooks")
    if not all(_plain_linear(getattr(module, p, None)) for p in ("proj_in", "proj_out")):
        return _warn("proj", "with proj_in / proj_out that are not plain nn.Linear (split inference, LoRA) or "
                     "that carry hooks")
    return _blocks_reason(module.transformer_blocks, "layer_norm")


def _blocks_reason(blocks, norm_type: str):
    """The first block's reason of ``_basic_block_reason``, else None."""
    return next((r for r in (_basic_block_reason(b, norm_type) for b in blocks) if r is not None), None)


def _svd_unsupported(block):
    """What does not depend on the call; attn2's projections are read only without a context."""
    attentions = ((block.attn1, True),) + (((block.attn2, False),) if block.attn2 is not None else ())
    if block.attn2 is not None and (hooked(block.norm2) or hooked(block.attn2.to_q) or hooked(block.attn2.to_k)):
        return _warn("cross_attention_hooks", "with hooks on norm2, attn2.to_q or attn2.to_k (not called: the "
                     "one-token cross-attention is to_out(to_v(context)))")
    return _block_reason(block, attentions, bypassed=False)


def _latte_unsupported(model):
    if not isinstance(getattr(model, "temp_pos_embed", None), torch.Tensor):
        return _warn("latte_positions", "without a temp_pos_embed tensor")
    if len(model.transformer_blocks) != len(model.temporal_transformer_blocks):
        return _warn("latte_blocks", "with different numbers of spatial and temporal blocks")
    return _blocks_reason(model.temporal_transformer_blocks, "ada_norm_single")


def unsupported(module):
    """A reason the fused forward cannot run ``module`` as it is now (checked at every call):
    blocks replaced (FreeNoise, split inference), processors, LoRA wrappers, hooks, chunking."""
    name = _kind(module).__name__
    if name in _CHANNEL_FIRST:
        return _channel_first_unsupported(module)
    if name == _SVD_BLOCK:
        return _svd_unsupported(module)
    return _latte_unsupported(module)


def _channel_first_reason(fused, args: dict):
    module, x, frames = fused.module, args["hidden_states"], args["num_frames"]
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or isinstance(frames, bool) or not isinstance(frames, int):
        return None, ""
    if frames < 1 or x.shape[0] % frames or x.shape[1] != module.norm.num_channels:
        return None, ""
    if args["encoder_hidden_states"] is not None:
        return _warn("encoder_hidden_states", "called with encoder_hidden_states (cross-attention over pixels)")
    if args["cross_attention_kwargs"]:
        return _warn("cross_attention_kwargs", "called with cross_attention_kwargs")
    clip = frames if fused.split is None else frames * fused.split.size  # under context parallelism: a share
    for block in module.transformer_blocks:
        if block.pos_embed is not None and clip > block.pos_embed.pe.shape[1]:
            return None, ""
    return _call_reason(module.transformer_blocks, module.proj_in.out_features)


def _svd_reason(fused, args: dict):
    block = fused.module
    x, frames, context = args["hidden_states"], args["num_frames"], args["encoder_hidden_states"]
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or isinstance(frames, bool) or not isinstance(frames, int):
        return None, ""
    if frames < 1 or x.shape[0] % frames:
        return None, ""
    query_dim = block.norm1.normalized_shape[0]
    if block.attn1.to_k.in_features != query_dim:
        return None, ""
    if block.attn2 is not None:
        if context is None:  # upstream: self-attention through attn2, whose projections the fused path reads
            if block.attn2.to_k.in_features != query_dim:
                return None, ""
            reason = _attention_reason(block.attn2, True)
            if reason is not None:
                return reason
        elif not isinstance(context, torch.Tensor) or context.dim() != 3:
            return None, ""
        elif context.shape[1] != 1:
            return _warn("context_tokens", f"with a time context of {context.shape[1]} tokens (fused: one)")
        elif context.shape[0] != x.shape[0] // frames * x.shape[1]:
            return None, ""
    return _dropout_reason((block,))


def _latte_reason(fused, args: dict):
    model = fused.module
    x = args["hidden_states"]
    if not args["enable_temporal_attentions"]:
        return None, ""  # nothing temporal to fuse
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        return None, ""
    if x.shape[2] > 1 and model.temp_pos_embed.shape[1] != x.shape[2]:
        return None, ""
    blocks = model.temporal_transformer_blocks
    return _call_reason(blocks, blocks[0].norm1.normalized_shape[0]) if len(blocks) else None


# --------------------------------------------------------------------------- fused forwards
def _channel_first(fused, args: dict) -> torch.Tensor:
    module, split, x, frames = fused.module, fused.split, args["hidden_states"], args["num_frames"]
    bf, c, height, width = x.shape
    batch, pixels = bf // frames, height * width
    flat = x.reshape(bf, c, pixels)
    h = linear_from_channels(group_norm_clips(flat, batch, frames, module.norm, split), module.proj_in)
    h = h.view(batch, frames * pixels, h.shape[-1])
    if split is not None:  # every layer of the blocks is per pixel but the attention: all run on the pixel split
        h, frames = split.to_patch_split(h, frames, "time_major"), frames * split.size
    for block in module.transformer_blocks:
        h = basic_block(block, h, frames, fused.backend)
    if split is not None:
        h = split.to_frame_split(h, batch, pixels, "time_major")
    out = linear_to_channels(h.view(bf, pixels, h.shape[-1]), module.proj_out)
    return (out + flat).view(bf, c, height, width)


def _svd(fused, args: dict) -> torch.Tensor:
    x, frames = args["hidden_states"], args["num_frames"]
    bf, s, c = x.shape
    h = svd_block(fused.module, x.reshape(bf // frames, frames * s, c), frames, args["encoder_hidden_states"],
                  fused.backend)
    return h.view(bf, s, h.shape[-1])


def _latte(fused, args: dict):
    """LatteTransformer3DModel.forward with the temporal blocks on frame-major tokens."""
    model, backend = fused.module, fused.backend
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
    return getattr(sys.modules[_kind(module).__module__], name)  # imported with the class; compile traces this


_RUN = {"AnimateDiffTransformer3D": (_channel_first_reason, _channel_first),
        "TransformerTemporalModel": (_channel_first_reason, _channel_first),
        _SVD_BLOCK: (_svd_reason, _svd), _LATTE: (_latte_reason, _latte)}


def forward(fused, args: tuple, kwargs: dict):
    module = fused.module
    cls = _kind(module)
    name = cls.__name__
    arguments = bind_arguments(_signature(module, cls), module, args, kwargs)
    if arguments is None:
        return fused.original()(*args, **kwargs)  # raises the original's own error
    reason, run = _RUN[name]
    fallback = reason(fused, arguments)
    if fallback is not None:
        return fused.run_original(*fallback, args, kwargs)
    if fused.runs_original_on_cpu(arguments["hidden_states"]):
        return fused.original()(*args, **kwargs)
    out = run(fused, arguments)
    if name not in _OUTPUTS:
        return out
    return _output_class(module, _OUTPUTS[name])(sample=out) if arguments["return_dict"] else (out,)
