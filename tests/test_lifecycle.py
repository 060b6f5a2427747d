"""A patched model stays the original model under what users do to it (CPU, backend "torch").

For every family (tests/lifecycle_models.py) and every operation below, in both orders (the
change, then tk.patch; tk.patch, then the change), the patched model's output and every
parameter gradient (which ones are None, their values, exact zeros where upstream's are zero)
equal the unpatched model's under the same operation, and the fused kernels either ran with no
fallback warning ("fused") or the original code ran with a warning ("fallback").
DDP and FSDP2: test_lifecycle_distributed.py.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import io
import types

import pytest
import torch
from torch import nn

import timesformer_kernels as tk
from lifecycle_models import FRAMES, available, dtype_of
from timesformer_kernels.integrations import FAMILIES as PATCHED_FAMILIES
from timesformer_kernels.integrations._common import FusedForward

FAMILIES = available()
TOL = {torch.float32: 2e-4, torch.float64: 1e-10, torch.float16: 2e-2}
pytestmark = pytest.mark.usefixtures("one_thread", "fresh_warnings")


@functools.lru_cache(maxsize=None)
def _base(name: str) -> nn.Module:
    return FAMILIES[name].build().eval()


def fresh(name: str) -> nn.Module:
    """The family's model, unpatched, in eval mode (a copy of one built per family)."""
    return copy.deepcopy(_base(name))


def measure(model: nn.Module, family) -> tuple:
    """Output and {parameter name: grad or None} of one forward and backward under a fixed seed."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    out = family.run(model)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    if out.requires_grad:  # not when nothing trainable reaches it (peft freezes the base, merged adapters)
        (out.double() * weights.double()).sum().backward()
    grads = {name.replace("_orig_mod.", ""): None if p.grad is None else p.grad.detach().clone()
             for name, p in model.named_parameters()}
    return out.detach(), grads


def assert_equivalent(ref: tuple, got: tuple, tol: float) -> None:
    """Outputs and gradients within ``tol`` of the largest reference value; the same gradients
    None; exact zeros where the reference gradient is all zeros."""
    (out_r, grads_r), (out_g, grads_g) = ref, got
    torch.testing.assert_close(out_g, out_r, atol=tol * max(1.0, out_r.abs().max().item()), rtol=tol)
    assert grads_g.keys() == grads_r.keys()
    assert {n for n, g in grads_g.items() if g is None} == {n for n, g in grads_r.items() if g is None}
    for name, r in grads_r.items():
        if r is None:
            continue
        g = grads_g[name]
        if not r.any():
            assert not g.any(), f"{name}: upstream's gradient is exactly zero, the patched one is not"
        torch.testing.assert_close(g, r, atol=tol * max(1.0, r.abs().max().item()), rtol=tol,
                                   msg=lambda m: f"gradient of {name}: {m}")


def patched_modules(model: nn.Module) -> list:
    """The modules tk.patch takes (whether patched already or not)."""
    return [m for m in model.modules() if any(f.matches(m) for f in PATCHED_FAMILIES.values())]


# ------------------------------------------------------------------------------ operations
def _pickled(model, family):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _load_other_weights(model, family):
    g = torch.Generator().manual_seed(5)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return model


def _freeze_half(model, family):
    for i, p in enumerate(model.parameters()):
        if i % 2 == 0:
            p.requires_grad_(False)
    return model


def _hooks_on_patched(model, family):
    """A pre-hook scaling the hidden state and a forward hook on every module tk.patch takes."""
    def scale(module, args):
        if args and isinstance(args[0], torch.Tensor):
            return (args[0] * 1.25,) + args[1:]
        return None

    for m in patched_modules(model):
        m.register_forward_pre_hook(scale)
        m.register_forward_hook(lambda module, args, out: None)
    return model


def _hook_on_bypassed(model, family):
    family.bypassed(model).register_forward_hook(lambda module, args, out: None)
    return model


def _wrap_forwards(model, family):
    """What accelerate's and diffusers' hooks do: a wrapper (functools.update_wrapper of a
    partial) as the instance's forward of every module tk.patch takes."""
    def wrapper(module, *args, **kwargs):
        return module._inner_forward(*args, **kwargs)

    for m in patched_modules(model):
        m._inner_forward = m.forward
        m.forward = functools.update_wrapper(functools.partial(wrapper, m), m.forward)
    return model


def _compiled_and_run(model, family):
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        family.run(compiled)
    return compiled


def _train(model, family):
    return model.train()


def _gradient_checkpointing(model, family):
    if family.name == "huggingface":
        model.gradient_checkpointing_enable()
    else:
        model.enable_gradient_checkpointing()
    return model.train()


def _lora(model, family):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(7)  # init_lora_weights=False: random A and B, so that the adapter changes the output
    config = LoraConfig(r=2, lora_alpha=4, target_modules=list(family.lora_targets), init_lora_weights=False)
    if hasattr(model, "add_adapter") and family.diffusers:  # diffusers' PeftAdapterMixin (UNetMotionModel)
        model.add_adapter(config)
    else:
        inject_adapter_in_model(config, model)
    return model


def _lora_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _lora_fused(model, family):
    model = _lora(model, family)
    if hasattr(model, "fuse_lora"):
        model.fuse_lora()
    else:
        for m in _lora_layers(model):
            m.merge()
    return model


def _lora_unfused(model, family):
    model = _lora_fused(model, family)
    if hasattr(model, "unfuse_lora"):
        model.unfuse_lora()
    else:
        for m in _lora_layers(model):
            m.unmerge()
    return model


def _lora_unloaded(model, family):
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = _lora(model, family)
    if hasattr(model, "unload_lora"):
        model.unload_lora()
        return model
    while True:  # the outermost adapter wrapper replaced by its base layer, until none is left
        name, m = next(((n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)), (None, None))
        if m is None:
            return model
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m.get_base_layer())


def _attentions(model):
    return [m for m in model.modules() if type(m).__name__ == "Attention" and hasattr(m, "set_processor")]


def _processor(make):
    def apply(model, family):
        for attn in _attentions(model):
            attn.set_processor(make())
        return model
    return apply


def _custom_processor():
    from diffusers.models.attention_processor import AttnProcessor2_0

    return type("MyProcessor", (AttnProcessor2_0,), {})()  # same maths, but the swap-in cannot know


def _default_processor():
    from diffusers.models.attention_processor import AttnProcessor

    return AttnProcessor()


def _fuse_qkv(model, family):
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    if hasattr(model, "fuse_qkv_projections"):
        model.fuse_qkv_projections()
        return model
    for attn in _attentions(model):
        attn.fuse_projections()
        attn.set_processor(FusedAttnProcessor2_0())
    return model


def _unfuse_qkv(model, family):
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = _fuse_qkv(model, family)
    if hasattr(model, "unfuse_qkv_projections"):
        model.unfuse_qkv_projections()
    else:
        _processor(AttnProcessor2_0)(model, family)
    return model


def _chunking(model, family):
    if hasattr(model, "enable_forward_chunking"):
        model.enable_forward_chunking()
    else:
        for m in model.modules():
            if hasattr(m, "set_chunk_feed_forward"):
                m.set_chunk_feed_forward(1)
    return model


class _Pipeline:
    """What AnimateDiffFreeNoiseMixin reads from its pipeline: the unet, a motion adapter's
    config, device and dtype; the mixin's own methods do the work."""

    def __init__(self, unet):
        from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin

        self.unet, self.device, self.dtype = unet, torch.device("cpu"), dtype_of(unet)
        self.motion_adapter = types.SimpleNamespace(config=types.SimpleNamespace(motion_max_seq_length=32))
        self.mixin = AnimateDiffFreeNoiseMixin
        for name in ("_lerp", "_enable_free_noise_in_block", "_disable_free_noise_in_block",
                     "_enable_split_inference_motion_modules_", "_enable_split_inference_attentions_",
                     "_enable_split_inference_resnets_", "_enable_split_inference_samplers_"):
            setattr(self, name, types.MethodType(getattr(AnimateDiffFreeNoiseMixin, name), self))

    def enable_free_noise(self):  # windows of 4 frames with stride 2 over the 6 frames
        self.mixin.enable_free_noise(self, context_length=4, context_stride=2)

    def disable_free_noise(self):
        self.mixin.disable_free_noise(self)

    def split_inference(self):  # splits of 2 pixels / 2 frames
        self.mixin.enable_free_noise_split_inference(self, spatial_split_size=2, temporal_split_size=2)


def _free_noise(model, family):
    _Pipeline(model).enable_free_noise()
    return model


def _free_noise_disabled(model, family):
    pipeline = _Pipeline(model)
    pipeline.enable_free_noise()
    pipeline.disable_free_noise()
    return model


def _split_inference(model, family):
    _Pipeline(model).split_inference()
    return model


def _always(family):
    return True


def _has_bypassed(family):
    return family.bypassed is not None


def _diffusers(family):
    return family.diffusers


def _lora_applies(family):
    return bool(family.lora_targets) and importlib.util.find_spec("peft") is not None


def _lora_expect(family):
    return "fused" if family.lora_fused else "fallback"


# name: (change, families it applies to, expectation, orders)
BOTH, AFTER = ("before", "after"), ("after",)
OPERATIONS = {
    "none": (lambda m, f: m, _always, "fused", AFTER),
    "deepcopy": (lambda m, f: copy.deepcopy(m), _always, "fused", BOTH),
    "pickle": (_pickled, _always, "fused", BOTH),
    "double": (lambda m, f: m.double(), _always, "fused", BOTH),
    # lucidrains' rotary tables stay fp32 buffers: upstream's own einsum raises in fp16
    "half": (lambda m, f: m.half(), lambda f: f.name != "lucidrains", "fused", BOTH),
    "train": (_train, _always, "fused", BOTH),
    "train_then_eval": (lambda m, f: m.train().eval(), _always, "fused", BOTH),
    "requires_grad_false": (_freeze_half, _always, "fused", BOTH),
    "load_state_dict": (_load_other_weights, _always, "fused", BOTH),
    "hooks_on_patched": (_hooks_on_patched, _always, "fused", BOTH),
    "hook_on_bypassed": (_hook_on_bypassed, _has_bypassed, "fallback", BOTH),
    "deepcopy_hook_on_bypassed": (lambda m, f: _hook_on_bypassed(copy.deepcopy(m), f), _has_bypassed, "fallback",
                                  AFTER),
    "pickle_hook_on_bypassed": (lambda m, f: _hook_on_bypassed(_pickled(m, f), f), _has_bypassed, "fallback", AFTER),
    "foreign_forward": (_wrap_forwards, _always, {"before": "fallback", "after": "fused"}, BOTH),
    "repatch": (lambda m, f: tk.patch(m, backend="torch"), _always, "fused", AFTER),
    "unpatch": (lambda m, f: tk.unpatch(m), _always, "original", AFTER),
    "deepcopy_unpatch": (lambda m, f: tk.unpatch(copy.deepcopy(m)), _always, "original", AFTER),
    "pickle_unpatch": (lambda m, f: tk.unpatch(_pickled(m, f)), _always, "original", AFTER),
    # fullgraph: the checks of every call trace without a graph break
    "compile": (lambda m, f: torch.compile(m, backend="aot_eager", fullgraph=True), _always, "fused", AFTER),
    "compiled_and_run": (_compiled_and_run, _always, "fused", ("before",)),  # patching recompiles
    "gradient_checkpointing": (_gradient_checkpointing, lambda f: f.name in ("huggingface", "animatediff", "latte"),
                               "fused", BOTH),
    "peft_lora": (_lora, _lora_applies, _lora_expect, BOTH),
    "peft_lora_fused": (_lora_fused, _lora_applies, _lora_expect, BOTH),
    "peft_lora_unfused": (_lora_unfused, _lora_applies, _lora_expect, BOTH),
    "peft_lora_unloaded": (_lora_unloaded, _lora_applies, "fused", BOTH),
    "default_processor": (_processor(_default_processor), _diffusers, "fused", BOTH),
    "custom_processor": (_processor(_custom_processor), _diffusers, "fallback", BOTH),
    "fuse_qkv_projections": (_fuse_qkv, _diffusers, "fused", BOTH),
    "unfuse_qkv_projections": (_unfuse_qkv, _diffusers, "fused", BOTH),
    "forward_chunking": (_chunking, _diffusers, "fallback", BOTH),
    "free_noise": (_free_noise, lambda f: f.name == "animatediff", "fallback", BOTH),
    "free_noise_disabled": (_free_noise_disabled, lambda f: f.name == "animatediff", "fused", BOTH),
    "free_noise_split_inference": (_split_inference, lambda f: f.name == "animatediff", "fallback", BOTH),
}
# The reference for these is the unchanged model (they concern tk.patch itself, or compile eagerly).
REFERENCE_UNCHANGED = {"repatch", "unpatch", "deepcopy_unpatch", "pickle_unpatch", "compile", "compiled_and_run"}
CASES = [pytest.param(family, op, order, id=f"{family}-{op}-{order}")
         for family in FAMILIES for op, (_, applies, _, orders) in OPERATIONS.items()
         if applies(FAMILIES[family]) for order in orders]


@pytest.fixture
def op_calls(monkeypatch):
    """The fused attention op calls (one per op, whatever the backend)."""
    from timesformer_kernels import backends

    calls = []
    choose = backends.choose

    def recording(backend, qkv, groups):
        calls.append(backend)
        return choose(backend, qkv, groups)

    monkeypatch.setattr(backends, "choose", recording)
    return calls


@pytest.mark.parametrize("family,op,order", CASES)
def test_lifecycle(family, op, order, op_calls, fallback_warnings):
    fam = FAMILIES[family]
    change, _, expect, _ = OPERATIONS[op]
    expect = expect(fam) if callable(expect) else expect
    expect = expect[order] if isinstance(expect, dict) else expect
    ref = measure(fresh(family) if op in REFERENCE_UNCHANGED else change(fresh(family), fam), fam)
    model = fresh(family)
    if order == "before":
        model = tk.patch(change(model, fam), backend="torch")
    else:
        model = change(tk.patch(model, backend="torch"), fam)
    del op_calls[:]
    got = measure(model, fam)
    assert_equivalent(ref, got, TOL[dtype_of(model)])
    warned = fallback_warnings()
    if expect == "fused":
        assert op_calls and not warned, warned
    elif expect == "fallback":
        assert warned
    else:  # the original code: unpatched
        assert not op_calls and not warned, warned


@pytest.mark.parametrize("order", ["hook_then_patch", "patch_then_hook"])
def test_accelerate_hooks(order, op_calls, fallback_warnings):
    """accelerate's add_hook_to_module (what device maps and CPU offload install) around a
    patched module: patched first, the hook wraps the fused forward (fused); hooked first, the
    hook's forward runs (warned). tk.unpatch and accelerate's remove_hook_from_module undo both,
    in either order, leaving the module's own forward."""
    hooks = pytest.importorskip("accelerate.hooks")
    family = FAMILIES["huggingface"]
    ref = measure(fresh("huggingface"), family)
    model = fresh("huggingface")
    layers = patched_modules(model)
    if order == "hook_then_patch":
        for layer in layers:
            hooks.add_hook_to_module(layer, hooks.ModelHook())
        tk.patch(model, backend="torch")
    else:
        tk.patch(model, backend="torch")
        for layer in layers:
            hooks.add_hook_to_module(layer, hooks.ModelHook())
    assert_equivalent(ref, measure(model, family), TOL[torch.float32])
    assert bool(op_calls) == (order == "patch_then_hook") and bool(fallback_warnings()) == (order == "hook_then_patch")
    tk.unpatch(model)
    for layer in layers:
        hooks.remove_hook_from_module(layer)
    tk.unpatch(model)  # a fused forward the hook still held comes back from remove_hook: removed now
    # (accelerate leaves the class's bound forward as the instance's, as on an unpatched model)
    assert not [m for m in layers if isinstance(m.__dict__.get("forward"), FusedForward)]
    del op_calls[:]
    assert_equivalent(ref, measure(model, family), 0.0)
    assert not op_calls
