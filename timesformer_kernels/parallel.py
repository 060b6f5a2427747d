"""Context parallelism at the ops level: each clip's frames split over the ranks of a process group.

Rank r of P holds frames [r·T/P, (r+1)·T/P) of every clip, T_l = T/P of them (the *frame
split*). Spatial attention and every per-token layer need nothing from other ranks there. An
op over all frames of a patch (temporal attention) needs a *patch split*, where rank r holds all
T frames of its patch positions n ∈ [n_r, n_{r+1}) (N_r of them; P need not divide N). One
all-to-all moves tokens from one split to the other::

    frame split, (B, N·T_l, C) in token order, viewed (T_l, B, N, C) whatever the order
      to rank s: its patches [n_s, n_{s+1}) as one contiguous (T_l, B, N_s, C) block
    received from the P ranks, in rank order: (P, T_l, B, N_r, C) = (T, B·N_r, C),
      i.e. a time-major clip of batch 1 with B·N_r patch columns: (1, T·B·N_r, C)

so the fused temporal op reads the received buffer in place (``token_order="time_major"``),
and ``to_frame_split`` is the same all-to-all in reverse. Rows are packed into the send buffer
and unpacked from the receive buffer with one copy each.

Collectives are ``torch.distributed._functional_collectives`` (torch 2.11-2.14): their ops carry
autograd (an all-to-all's backward is the reverse all-to-all, an all-gather's a reduce-scatter of
the sum, an all-reduce's an all-reduce) and torch.compile traces them. A slice of a tensor every
rank holds (``shard``) has a zero-padded backward with no communication. What the gradients
then mean on each rank is written down in ``integrations/context_parallel.py``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import Tensor

from .layout import TOKEN_ORDERS

# torch 2.14 renamed all_gather_tensor (deprecated there) to all_gather_single, which 2.11 lacks
_all_gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor


def resolve_group(group):
    """The ProcessGroup of ``group``: a ProcessGroup, a 1-D DeviceMesh, or None (the world)."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("group: None means the default process group, but torch.distributed is not "
                             "initialized (call torch.distributed.init_process_group first)")
        return dist.group.WORLD
    # a DeviceMesh exists only once its module is imported: no need to import it here
    mesh_type = getattr(getattr(dist, "device_mesh", None), "DeviceMesh", None)
    if mesh_type is not None and isinstance(group, mesh_type):
        if group.ndim != 1:
            raise ValueError(f"group: a DeviceMesh must be 1-D (the context dimension), got {group.ndim} "
                             "dimensions; pass the context dimension, e.g. mesh['context']")
        return group.get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup, a 1-D DeviceMesh or None, "
                        f"got {type(group).__name__}")
    return group


class FrameSplit:
    """The frames of every clip split over the ``size`` ranks of ``group``; this process is ``rank``.

    Every method is called by all ranks of the group in the same order (they run collectives)."""

    def __init__(self, group):
        self.group = resolve_group(group)
        self.size, self.rank = self.group.size(), self.group.rank()
        if self.rank < 0:
            raise ValueError("group: this process is not a member of the group")

    def __deepcopy__(self, memo):
        return self  # a copy (of a model: an EMA) splits its frames over the same group

    def __reduce_ex__(self, protocol):  # what pickle calls
        raise TypeError("a context-parallel model holds a process group: it cannot be pickled (save its "
                        "state_dict, or pickle the model before tk.context_parallel; tk.unpatch undoes it)")

    # ------------------------------------------------------------------ frames
    def local_frames(self, frames: int) -> int:
        """T_l = T / P, or ValueError naming both."""
        if frames % self.size:
            raise ValueError(f"num_frames ({frames}) must be divisible by the context-parallel group size "
                             f"({self.size})")
        return frames // self.size

    def shard(self, x: Tensor, dim: int) -> Tensor:
        """This rank's frames of ``x``, whose ``dim`` indexes all T frames (a view; the backward is
        zero-padded, no communication)."""
        local = self.local_frames(x.shape[dim])
        return x.narrow(dim, self.rank * local, local)

    def gather(self, x: Tensor, dim: int) -> Tensor:
        """All frames: the ranks' ``x`` concatenated along the frame dim ``dim`` (every rank gets all)."""
        rows = _wait(_all_gather(x.contiguous(), 0, self.group))  # (P·x.shape[0], ...), rank after rank
        return torch.cat(rows.chunk(self.size), dim) if dim else rows

    def sum(self, x: Tensor) -> Tensor:
        """The sum of ``x`` over the ranks (every rank gets it)."""
        return _wait(fc.all_reduce(x, "sum", self.group))

    def shard_tokens(self, x: Tensor, frames: int, token_order: str = "space_major") -> Tensor:
        """(B, 1 + N·T, C) with the cls token at row 0 -> (B, 1 + N·T_l, C): the cls token and this
        rank's T_l frames, in the same token order."""
        grid, dim = _token_grid(x[:, 1:], frames, token_order)
        return torch.cat([x[:, :1], self.shard(grid, dim).flatten(1, 2)], dim=1)

    def gather_tokens(self, x: Tensor, frames: int, token_order: str = "space_major") -> Tensor:
        """Inverse of ``shard_tokens``: this rank's (B, 1 + N·T_l, C), ``frames`` = T_l -> (B, 1 + N·T, C)."""
        grid, dim = _token_grid(x[:, 1:], frames, token_order)
        return torch.cat([x[:, :1], self.gather(grid, dim).flatten(1, 2)], dim=1)

    # ---------------------------------------------------------- patch split
    def patch_counts(self, patches: int) -> list[int]:
        """N_s, the patch positions rank s holds in the patch split (the first N mod P ranks one more)."""
        if patches < self.size:
            raise ValueError(f"{patches} patch positions per frame cannot be split over the {self.size} ranks of "
                             "the context-parallel group (need at least one per rank)")
        q, extra = divmod(patches, self.size)
        return [q + (s < extra) for s in range(self.size)]

    def patch_range(self, patches: int) -> tuple[int, int]:
        """[start, stop) of the patch positions this rank holds in the patch split."""
        return _ranges(self.patch_counts(patches))[self.rank]

    def to_patch_split(self, x: Tensor, frames: int, token_order: str) -> Tensor:
        """This rank's T_l = ``frames`` frames of (B, N·T_l, C) tokens in ``token_order`` ->
        (1, T·B·N_r, C): all T frames of its N_r patch positions, time-major (module docstring)."""
        src = _frames_view(x, frames, token_order)
        _, b, patches, c = src.shape
        counts = self.patch_counts(patches)
        send = x.new_empty(frames * b * patches, c)
        for s, (start, stop) in enumerate(_ranges(counts)):
            # each block's view taken after the previous copy: autograd rejects an in-place write
            # through a view taken before the buffer joined the graph
            _block(send, s, frames, b, counts).copy_(src[:, :, start:stop])
        recv = self._all_to_all(send, [frames * b * counts[self.rank]] * self.size, [frames * b * n for n in counts])
        return recv.view(1, -1, c)

    def to_frame_split(self, y: Tensor, batch: int, patches: int, token_order: str) -> Tensor:
        """Inverse of ``to_patch_split``: (1, T·B·N_r, C) -> (B, N·T_l, C) in ``token_order``."""
        c = y.shape[-1]
        counts = self.patch_counts(patches)
        columns = batch * counts[self.rank] * self.size
        if y.dim() != 3 or y.shape[0] != 1 or y.shape[1] % columns:
            raise ValueError(f"y must be (1, T*{columns // self.size}, C) for batch={batch}, patches={patches}, "
                             f"got shape {tuple(y.shape)}")
        frames = y.shape[1] // columns
        recv = self._all_to_all(y.reshape(-1, c), [frames * batch * n for n in counts],
                                [frames * batch * counts[self.rank]] * self.size)
        out = y.new_empty(batch, patches * frames, c)
        dst = _frames_view(out, frames, token_order)
        for s, (start, stop) in enumerate(_ranges(counts)):
            dst[:, :, start:stop].copy_(_block(recv, s, frames, batch, counts))
        return out

    # ------------------------------------------------------------ internals
    def _all_to_all(self, rows: Tensor, out_sizes: list[int], in_sizes: list[int]) -> Tensor:
        even = len(set(out_sizes)) == 1 and len(set(in_sizes)) == 1
        return _wait(fc.all_to_all_single(rows.contiguous(), None if even else out_sizes, None if even else in_sizes,
                                          self.group))


def _wait(x: Tensor) -> Tensor:
    """A collective's result, complete: in eager mode the functional collectives return an
    AsyncCollectiveTensor that waits when first used (one never used would stay in flight, and
    users would get that subclass as outputs); under torch.compile a plain tensor."""
    return x.wait() if isinstance(x, fc.AsyncCollectiveTensor) else x


def _block(rows: Tensor, s: int, frames: int, batch: int, counts: list[int]) -> Tensor:
    """Rank s's (T_l, B, N_s, C) block of a send or receive buffer of (T_l·B·N, C) rows."""
    start = frames * batch * sum(counts[:s])
    return rows.narrow(0, start, frames * batch * counts[s]).view(frames, batch, counts[s], rows.shape[-1])


def _ranges(counts: list[int]) -> list[tuple[int, int]]:
    starts = [sum(counts[:s]) for s in range(len(counts))]
    return [(a, a + n) for a, n in zip(starts, counts)]


def _token_grid(x: Tensor, frames: int, token_order: str) -> tuple[Tensor, int]:
    """(B, N·T, C) patch tokens as a (B, N, T, C) or (B, T, N, C) view, and its frame dim."""
    if token_order not in TOKEN_ORDERS:
        raise ValueError(f"token_order must be one of {TOKEN_ORDERS}, got {token_order!r}")
    tokens = x.shape[1]
    if tokens % frames or tokens == 0:
        raise ValueError(f"x has {tokens} patch tokens, not a positive multiple of its {frames} frames")
    patches = tokens // frames
    if token_order == "space_major":
        return x.unflatten(1, (patches, frames)), 2
    return x.unflatten(1, (frames, patches)), 1


def _frames_view(x: Tensor, frames: int, token_order: str) -> Tensor:
    """(B, N·T, C) patch tokens in ``token_order`` as a (T, B, N, C) view."""
    grid, dim = _token_grid(x, frames, token_order)
    return grid.permute(2, 0, 1, 3) if dim == 2 else grid.transpose(0, 1)
