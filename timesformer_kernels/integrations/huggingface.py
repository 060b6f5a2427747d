"""Swap-in for Hugging Face transformers' ``TimesformerLayer`` (attention_type "divided_space_time").

Matched by class name (any class in the MRO named ``TimesformerLayer``, so wrapper subclasses
count too) and its ``attention_type``; layers with "space_only" or "joint_space_time" are
left alone. The fused forward reproduces ``TimesformerLayer.forward``: it takes the same
arguments and returns the same 1-tuple ``(layer_output,)``. Like the original it uses
``config.num_frames`` frames and ``config.image_size // config.patch_size`` patches per row,
the patch height being derived from the token count; token counts the original cannot
reshape go to the original, which raises its own error.

    temporal: temporal_layernorm -> temporal_attention.attention.qkv -> attention over T
              -> temporal_attention.output.dense -> drop_path (per clip, patch) -> temporal_dense
    spatial:  layernorm_before -> attention.attention.qkv -> attention over [cls, N patches]
              -> attention.output.dense -> drop_path (per clip, frame), cls averaged over frames
    MLP:      layernorm_after -> intermediate -> output -> drop_path (per clip)

Drop-path masks are drawn with ``torch.rand`` in the same shapes and order as
``TimesformerDropPath``, so the same seed gives the same outputs. Gradient checkpointing
(``model.gradient_checkpointing_enable()``) keeps working: the fused layer is checkpointed the
same way as the original.

Checked at every call (``matches``, ``unsupported``): the attention submodules still run
``TimeSformerAttention`` / ``TimesformerSelfAttention`` / ``TimesformerSelfOutput``'s forward
(the fused path replaces those, and calls the Linears, norms, intermediate and output as
modules, so peft/LoRA-wrapped Linears stay fused) and carry no hooks. Calls the fused path
cannot reproduce run the original forward, with a warning once: ``output_attentions=True``
(the fused kernels keep no probabilities), dropout active in training in either attention
(``attention_probs_dropout_prob`` or ``hidden_dropout_prob`` > 0), any extra argument that is
not its default (head masks of other versions), or an unrecognised drop-path module. The
attention's ``scale`` is read at each call.
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch

from ._common import (active_dropout, bind_arguments, class_named, divided_block, drop_path_prob,
                      forward_class, has_attributes, hooks_reason, signature_of)

KIND = "huggingface"
CPU_AUTO = "fused_without_grad"  # backend "auto" on CPU tensors (README, "On the CPU")
_CLASS = "TimesformerLayer"
_PARTS = ("temporal_layernorm", "temporal_attention", "temporal_dense", "layernorm_before", "attention",
          "layernorm_after", "intermediate", "output", "drop_path", "config")
# The submodules whose forward the fused path replaces: (class whose forward they run, attributes it reads).
_ATTENTION = ("TimeSformerAttention", ("attention", "output"))
_SELF_ATTENTION = ("TimesformerSelfAttention", ("qkv", "num_heads", "scale", "attn_drop"))
_SELF_OUTPUT = ("TimesformerSelfOutput", ("dense", "dropout"))


def _attention_type(module) -> Optional[str]:
    config = getattr(module, "config", None)
    return getattr(module, "attention_type", getattr(config, "attention_type", None))


def _is(module, spec) -> bool:
    name, attributes = spec
    return forward_class(module) == name and has_attributes(module, attributes)


def _attention_ok(attention) -> bool:
    return (_is(attention, _ATTENTION) and _is(attention.attention, _SELF_ATTENTION)
            and _is(attention.output, _SELF_OUTPUT))


def matches(module) -> bool:
    if class_named(module, (_CLASS,)) is None:
        return False
    if _attention_type(module) != "divided_space_time":
        return False
    if getattr(getattr(module, "config", None), "attention_type", "divided_space_time") != "divided_space_time":
        return False
    if signature_of(type(module).forward) is None or not has_attributes(module, _PARTS):
        return False
    return _attention_ok(module.temporal_attention) and _attention_ok(module.attention)


def unsupported(layer):
    """Hooks on the submodules the fused path does not call (it calls the Linears and norms)."""
    ta, sa = layer.temporal_attention, layer.attention
    return hooks_reason(KIND, (("temporal_attention", ta), ("temporal_attention.attention", ta.attention),
                               ("temporal_attention.output", ta.output), ("attention", sa),
                               ("attention.attention", sa.attention), ("attention.output", sa.output),
                               ("drop_path", layer.drop_path)))


def _fallback_reason(fused, arguments: dict, signature: inspect.Signature, hidden_name: str):
    """(key, message) of a warned fallback, (None, "") for a silent one (the original raises
    or must decide), (None, None) when the fused path runs."""
    layer = fused.module
    for name, value in arguments.items():
        if name in ("self", hidden_name):
            continue
        param = signature.parameters[name]
        if name == "output_attentions":
            if value:
                return ("huggingface:output_attentions",
                        "timesformer_kernels: TimesformerLayer called with output_attentions=True: the fused "
                        "kernels keep no attention probabilities, so such calls run the original code")
        elif param.kind is param.VAR_KEYWORD:
            if value:
                return (f"huggingface:kwargs:{','.join(sorted(value))}",
                        f"timesformer_kernels: TimesformerLayer called with {sorted(value)}: "
                        "such calls run the original (unfused) code")
        elif param.kind is param.VAR_POSITIONAL:
            if value:
                return ("huggingface:args", "timesformer_kernels: TimesformerLayer called with extra positional "
                        "arguments: such calls run the original (unfused) code")
        elif value is not param.default and value is not None:
            return (f"huggingface:arg:{name}",
                    f"timesformer_kernels: TimesformerLayer called with {name} (head masks and other extra "
                    "inputs are not supported by the fused path): such calls run the original (unfused) code")
    hidden = arguments[hidden_name]
    config = layer.config
    frames, image, patch = (getattr(config, a, None) for a in ("num_frames", "image_size", "patch_size"))
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        return None, ""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (frames, image, patch)):
        return None, ""  # e.g. a (h, w) image_size, which the original's arithmetic rejects
    if frames < 1 or patch < 1 or image // patch < 1:
        return None, ""
    tokens = hidden.shape[1] - 1
    frames = fused.local_frames(frames)
    width = image // patch
    height = (tokens // frames) // width
    if height < 1 or height * width * frames != tokens:
        return None, ""
    if active_dropout(layer.temporal_attention, layer.attention):
        return ("huggingface:dropout",
                "timesformer_kernels: TimesformerLayer in training with attention_probs_dropout_prob or "
                "hidden_dropout_prob > 0: dropout inside the attention cannot be reproduced by the fused "
                "kernels, so these calls run the original code")
    if drop_path_prob(layer.drop_path) is None:
        return ("huggingface:drop_path",
                f"timesformer_kernels: drop-path module {type(layer.drop_path).__name__} is not one the fused "
                "path reproduces: these calls run the original (unfused) code")
    return None, None


def _fused_layer(fused, hidden: torch.Tensor):
    layer = fused.module
    prob = drop_path_prob(layer.drop_path)
    ta, sa = layer.temporal_attention, layer.attention
    temporal = (layer.temporal_layernorm, ta.attention.qkv, ta.output.dense, layer.temporal_dense,
                ta.attention.num_heads, ta.attention.scale, prob)
    spatial = (layer.layernorm_before, sa.attention.qkv, sa.output.dense, sa.attention.num_heads,
               sa.attention.scale, prob)
    mlp = (layer.layernorm_after, lambda h: layer.output(layer.intermediate(h)), layer.drop_path, prob)
    return (divided_block(hidden, fused.local_frames(layer.config.num_frames), temporal, spatial, mlp, fused.backend,
                          fused.split),)


def forward(fused, args: tuple, kwargs: dict):
    layer = fused.module
    signature = signature_of(type(layer).forward)  # follows functools.wraps to the layer's own
    hidden_name = list(signature.parameters)[1]
    arguments = bind_arguments(signature, layer, args, kwargs)
    if arguments is None:
        return fused.original()(*args, **kwargs)  # raises the original's own error
    key, message = _fallback_reason(fused, arguments, signature, hidden_name)
    if message is not None:
        return fused.run_original(key, message, args, kwargs)
    hidden = arguments[hidden_name]
    if fused.runs_original_on_cpu(hidden):
        return fused.original()(*args, **kwargs)
    # Mirror GradientCheckpointingLayer: the class forward it wraps is bypassed by patching.
    if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
        return layer._gradient_checkpointing_func(functools.partial(_fused_layer, fused), hidden)
    return _fused_layer(fused, hidden)
