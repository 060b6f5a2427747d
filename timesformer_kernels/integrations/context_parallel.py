"""``tk.context_parallel``: a patched model run with each clip's frames split over the ranks of a group.

Every rank of the group calls the model with the same inputs and gets the unsharded model's
outputs; inside, rank r of P holds frames [r·T/P, (r+1)·T/P) of every clip (activations, and
what autograd saves, are 1/P per rank) and the layers that mix frames communicate
(``parallel.FrameSplit``):

- Hugging Face TimeSformer (every ``TimesformerEncoder`` whose layers ``tk.patch`` fused): a
  forward pre-hook on the encoder keeps the cls token and this rank's frames of the embeddings,
  the layers run on them (spatial attention, norms and MLP need nothing from other ranks; the
  temporal branch runs between two all-to-alls, the cls token's mean over frames is an
  all-reduce, drop-path masks are drawn for all frames, in upstream's order, and sliced), and a
  forward hook all-gathers ``last_hidden_state`` and every ``hidden_states`` entry.
- The official TimeSformer structure (any module holding ``blocks`` of official-structure
  blocks, ``forward(x, B, T, W)``): the same layers; hooks on the first block (this rank's frames
  in) and the last (all frames out).
- diffusers ``UNetMotionModel`` (AnimateDiff, inference; the backward works too): a pre-hook
  gives the UNet this rank's frames of ``sample`` and of the per-frame inputs (leading dim
  B·F: ``encoder_hidden_states``, ``attention_mask``, the ControlNet residuals). Everything but
  the motion modules treats frames as batch; each motion module takes its GroupNorm statistics
  over all ranks and runs its transformer blocks on a pixel split (one all-to-all in, one
  out, whatever the number of attentions). A forward hook all-gathers the output's frames.

Gradients. Every rank computes the same loss from the same outputs, so autograd starts on every
rank from the full gradient of the outputs. Call a tensor that only this rank holds (a frame
shard, a patch shard) *sharded* and one that every rank holds (parameters, the cls token,
inputs, gathered outputs) *replicated*. Then on every rank, always:

    sharded tensor:     its gradient is P times its true gradient;
    replicated tensor:  its gradient is this rank's part; the parts sum to P times the true one.

It holds at the outputs (P equal full gradients), and every step back keeps it: an all-gather's
backward reduce-scatters the sum (P full parts -> P times the shard's gradient); an all-reduce's
backward is an all-reduce (sums of parts); an all-to-all's is the reverse all-to-all (a
permutation of sharded values); a shard of a replicated tensor has a zero-padded backward (the
P shards' parts sum to P times the whole); the layers on replicated tensors (the cls token's
MLP, the classifier) are linear in their output's gradient, so parts stay parts. Hence each
parameter's gradient *averaged over the group* is its true gradient:

- ``reduce_grads=True``: at the end of every backward the parameter gradients that backward
  produced are averaged over the group (bucketed all-reduces queued on autograd's final
  callback). The average of values already equal on every rank is unchanged, so gradients
  accumulated over several backward passes come out right without a ``no_sync``.
- ``reduce_grads=False``: each rank keeps its own, for a data-parallel wrapper that averages over
  every rank of a data × context mesh: ``DistributedDataParallel`` over the world group, or
  FSDP2's ``fully_shard`` over the 2-D mesh (HSDP). Averaging P·(parts) over D·P ranks gives the
  mean over the D data groups of their true gradients: the unsharded model's gradient on the
  combined batch of a mean loss. Input gradients (replicated) also need averaging over the group.

Drop-path in training draws its masks on every rank: the ranks' random generators must agree
(seed them alike and draw from them alike), as the layers of one rank see only its frames.

The fused forwards keep tk.patch's checks at every call, but the original code cannot run on a
split of the frames: where a patched model would run it (a fallback, backend "auto" on CPU
tensors), a context-parallel one raises ValueError for a fallback and runs the fused code for
"auto". ``copy.deepcopy`` of the model (an EMA) is context-parallel over the same group;
pickling it raises TypeError (a process group is not data: save the state_dict).
"""
from __future__ import annotations

import copy
import inspect
from collections import defaultdict
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from ..parallel import FrameSplit
from . import diffusers, huggingface, official
from ._common import fused_forward_of

STATE_ATTR = "_tk_context_parallel"  # on the model: what context_parallel installed, for tk.unpatch
_BUCKET_BYTES = 25 * 2**20  # gradient all-reduce bucket, like DDP's default


def context_parallel(model: nn.Module, group=None, reduce_grads: bool = True) -> nn.Module:
    """Split each clip's frames over the ranks of ``group`` (a ProcessGroup, a 1-D DeviceMesh, or None
    for the default group) in a model ``tk.patch`` has patched; returns ``model``.

    Every rank calls the model with the same inputs and gets the unsharded outputs. With
    ``reduce_grads`` every backward leaves each rank the unsharded model's parameter gradients;
    without, partial gradients for DDP/FSDP2 over a data × context mesh (module docstring).
    ``tk.unpatch(model)`` undoes this and the patch. On a group of one, the model is returned as it is.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(reduce_grads, bool):
        raise TypeError(f"reduce_grads must be a bool, got {type(reduce_grads).__name__}")
    if STATE_ATTR in model.__dict__:
        raise ValueError(f"model: {type(model).__name__} is already context-parallel (tk.unpatch undoes it)")
    roots = [(family, m) for m in model.modules() for family in _FAMILIES if family.matches(m)]
    if not roots:
        raise ValueError(f"model: tk.context_parallel found nothing it supports in {type(model).__name__} "
                         "(supported: Hugging Face TimesformerModel / TimesformerForVideoClassification, the "
                         "official TimeSformer's blocks, diffusers UNetMotionModel, patched by tk.patch; not "
                         "mmaction2 or lucidrains)")
    for family, root in roots:
        family.check_patched(root)
    split = FrameSplit(group)
    for family, root in roots:
        family.check_frames(root, split)
    if split.size == 1:
        return model
    state = _State(split)
    for family, root in roots:
        family.wire(root, state)
    if reduce_grads:
        state.average_gradients([p for p in model.parameters() if p.requires_grad])
    model.__dict__[STATE_ATTR] = state
    return model


def undo(model: nn.Module) -> None:
    """Remove what ``context_parallel`` installed in ``model`` (``tk.unpatch`` calls this)."""
    state = model.__dict__.pop(STATE_ATTR, None)
    if state is not None:
        state.remove()


class _State:
    """What context_parallel installed in a model, so that it can be removed: the split of the
    fused forwards, the hooks that shard and gather, the gradient averaging."""

    def __init__(self, split: FrameSplit):
        self.split = split
        self.fused: list = []  # the FusedForwards running on this rank's frames
        self.handles: list = []  # of the forward hooks
        self.params: list = []  # those whose gradients are averaged
        self.grad_handles: list = []  # of their post-accumulate-grad hooks
        self.pending: list = []  # those whose gradient this backward produced
        self.average_queued = False

    def __deepcopy__(self, memo):
        """The state of a deep copy of the model (an EMA): the same group (``FrameSplit`` copies
        share it), the copy's fused forwards and forward hooks (copied with its modules, so these
        handles, copied through ``memo``, remove the copy's), and the averaging on the copy's
        parameters (a copied tensor has no hooks)."""
        state = _State(self.split)
        state.fused, state.handles = copy.deepcopy(self.fused, memo), copy.deepcopy(self.handles, memo)
        state.average_gradients(copy.deepcopy(self.params, memo))
        return state

    def set_split(self, modules) -> None:
        """The fused forwards of ``modules`` run on this rank's frames from now on."""
        for module in modules:
            fused = fused_forward_of(module)
            fused.split = self.split
            self.fused.append(fused)

    def hook(self, first: nn.Module, pre, last: nn.Module, post) -> None:
        """``pre(split, first, arguments)`` edits the bound arguments of ``first``'s forward before it
        runs (this rank's frames in), ``post(split, last, arguments, tensor)`` maps every tensor
        ``last`` returns (all frames out)."""
        self.handles.append(first.register_forward_pre_hook(partial(_pre, pre, self.split), with_kwargs=True))
        self.handles.append(last.register_forward_hook(partial(_post, post, self.split), with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles + self.grad_handles:
            handle.remove()
        for fused in self.fused:
            fused.split = None

    # ------------------------------------------------------------------ gradients
    def average_gradients(self, params: list) -> None:
        """Average the gradients of ``params`` over the group at the end of every backward."""
        self.params = params
        self.grad_handles = [p.register_post_accumulate_grad_hook(self._ready) for p in params]

    def _ready(self, param: torch.Tensor) -> None:
        self.pending.append(param)
        # Queued on every gradient (a backward that raised midway leaves nothing stuck); the first
        # of these callbacks queues the averaging behind every callback queued in this backward,
        # DDP's included, which would otherwise overwrite the averaged gradients with its own.
        torch.autograd.Variable._execution_engine.queue_callback(self._queue_average)

    def _queue_average(self) -> None:
        if not self.average_queued:
            self.average_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._average)

    def _average(self) -> None:
        ready = {id(p) for p in self.pending}
        self.pending, self.average_queued = [], False
        # in model order, the same on every rank
        kinds = defaultdict(list)
        for p in self.params:
            if id(p) in ready and p.grad is not None:
                kinds[(p.grad.dtype, p.grad.device)].append(p.grad)
        works = []
        for grads in kinds.values():
            for bucket in _buckets(grads):
                flat = torch.cat([g.reshape(-1) for g in bucket])
                works.append((dist.all_reduce(flat, group=self.split.group, async_op=True), flat, bucket))
        for work, flat, bucket in works:
            work.wait()
            flat.div_(self.split.size)
            for g, avg in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(avg.view_as(g))


def _buckets(grads: list):
    bucket, size = [], 0
    for g in grads:
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= _BUCKET_BYTES:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def _bound(module, args, kwargs) -> inspect.BoundArguments:
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    bound.apply_defaults()
    return bound


def _pre(fn, split, module, args, kwargs):
    bound = _bound(module, args, kwargs)
    fn(split, module, bound.arguments)
    return bound.args[1:], bound.kwargs


def _post(fn, split, module, args, kwargs, output):
    return _map_tensors(output, partial(fn, split, module, _bound(module, args, kwargs).arguments))


def _map_tensors(value, fn):
    """``value`` with every tensor in it (in tuples, lists, dicts / ModelOutputs) replaced by fn(tensor)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        for key in list(value.keys()):
            value[key] = _map_tensors(value[key], fn)
    return value


def _require_patched(root: nn.Module, layers, family, what: str) -> None:
    """ValueError naming the ``layers`` of ``root`` that tk.patch did not fuse with ``family``."""
    fused = [fused_forward_of(layer) for layer in layers]
    unpatched = [i for i, f in enumerate(fused) if f is None or not f.active or f.family != family.KIND]
    if unpatched or not layers:
        which = f"{what} {unpatched}" if unpatched else f"the {what}"
        raise ValueError(f"model: {which} of {type(root).__name__} are not patched by tk.patch (call tk.patch(model) "
                         "first)")


def _mro_names(module: nn.Module) -> set:
    return {cls.__name__ for cls in type(module).__mro__}


# ---------------------------------------------------------------- Hugging Face
class _HuggingFace:
    """TimesformerEncoder: shard the embeddings' frames before its layers, gather after."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return "TimesformerEncoder" in _mro_names(module) and isinstance(getattr(module, "layer", None), nn.ModuleList)

    @staticmethod
    def check_patched(encoder: nn.Module) -> None:
        _require_patched(encoder, encoder.layer, huggingface, "layers")

    @staticmethod
    def check_frames(encoder: nn.Module, split: FrameSplit) -> None:
        split.local_frames(encoder.config.num_frames)

    @staticmethod
    def wire(encoder: nn.Module, state: _State) -> None:
        state.set_split(encoder.layer)
        state.hook(encoder, _HuggingFace.pre, encoder, _HuggingFace.post)

    @staticmethod
    def pre(split: FrameSplit, encoder: nn.Module, arguments: dict) -> None:
        name = list(arguments)[1]  # hidden_states, the first argument after self
        arguments[name] = split.shard_tokens(arguments[name], encoder.config.num_frames)

    @staticmethod
    def post(split: FrameSplit, encoder: nn.Module, arguments: dict, hidden: torch.Tensor) -> torch.Tensor:
        return split.gather_tokens(hidden, split.local_frames(encoder.config.num_frames))


# -------------------------------------------------------------------- official
class _Official:
    """A module holding its ``blocks`` (official TimeSformer ``VisionTransformer`` and copies): the
    first block gets this rank's frames, the last one's output is gathered. The blocks take
    ``forward(x, B, T, W)`` with the whole clip's T; the fused forward uses T/P."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        blocks = getattr(module, "blocks", None)
        return isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and all(official.matches(b) for b in blocks)

    @staticmethod
    def check_patched(owner: nn.Module) -> None:
        _require_patched(owner, owner.blocks, official, "blocks")

    @staticmethod
    def check_frames(owner: nn.Module, split: FrameSplit) -> None:
        """The frame count T comes with each call: checked there."""

    @staticmethod
    def wire(owner: nn.Module, state: _State) -> None:
        state.set_split(owner.blocks)
        state.hook(owner.blocks[0], _Official.pre, owner.blocks[-1], _Official.post)

    @staticmethod
    def pre(split: FrameSplit, block: nn.Module, arguments: dict) -> None:
        x, frames = list(arguments)[1], list(arguments)[3]  # forward(self, x, B, T, W)
        arguments[x] = split.shard_tokens(arguments[x], int(arguments[frames]))

    @staticmethod
    def post(split: FrameSplit, block: nn.Module, arguments: dict, x: torch.Tensor) -> torch.Tensor:
        return split.gather_tokens(x, split.local_frames(int(list(arguments.values())[3])))


# ------------------------------------------------------------------- diffusers
_PER_FRAME = ("encoder_hidden_states", "attention_mask", "down_block_additional_residuals",
              "mid_block_additional_residual")


class _UNetMotion:
    """UNetMotionModel: its frame-local blocks on this rank's frames, motion modules across ranks."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return "UNetMotionModel" in _mro_names(module)

    @staticmethod
    def motion_modules(unet: nn.Module) -> list:
        return [m for m in unet.modules() if "AnimateDiffTransformer3D" in _mro_names(m)]

    @staticmethod
    def check_patched(unet: nn.Module) -> None:
        _require_patched(unet, _UNetMotion.motion_modules(unet), diffusers, "motion modules")

    @staticmethod
    def check_frames(unet: nn.Module, split: FrameSplit) -> None:
        """The frame count comes with each call (``sample.shape[2]``): checked there."""

    @staticmethod
    def wire(unet: nn.Module, state: _State) -> None:
        state.set_split(_UNetMotion.motion_modules(unet))
        state.hook(unet, _UNetMotion.pre, unet, _UNetMotion.post)

    @staticmethod
    def pre(split: FrameSplit, unet: nn.Module, arguments: dict) -> None:
        sample = arguments["sample"]  # (B, C, F, H, W)
        batch, frames = sample.shape[0], sample.shape[2]
        arguments["sample"] = split.shard(sample, 2)

        def per_frame(x: torch.Tensor) -> torch.Tensor:  # (B·F, ...) -> (B·F_l, ...)
            if x.dim() == 0 or x.shape[0] != batch * frames:
                return x
            return split.shard(x.unflatten(0, (batch, frames)), 1).flatten(0, 1)

        for name in _PER_FRAME:
            if name in arguments:
                arguments[name] = _map_tensors(arguments[name], per_frame)

    @staticmethod
    def post(split: FrameSplit, unet: nn.Module, arguments: dict, sample: torch.Tensor) -> torch.Tensor:
        return split.gather(sample, 2)


_FAMILIES = (_HuggingFace, _Official, _UNetMotion)
