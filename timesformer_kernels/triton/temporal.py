"""Triton attention over many short groups: temporal attention, S <= max_seq(head_dim) keys.

A temporal group is tiny (S = T = 8 typical) while ``tl.dot`` wants 16+ rows, so one program
owns a tile of BLOCK_M query rows that holds BLOCK_M // T_PAD whole groups (T_PAD =
next_pow2(S) rows each, rows p >= S masked). The keys of those groups are the same rows, so
one BLOCK_M x BLOCK_M ``tl.dot`` scores them all and a block-diagonal mask drops the
cross-group scores. Only real token rows are loaded or stored: memory traffic is qkv + out
+ lse (+ dout and dqkv backward); the masked arithmetic is cheap next to it, as the op is
memory-bound. Rows are addressed with ``layout``'s formula (``Groups``), which covers both
token orders; ``cls_key`` adds row 0 as one more key/value of every group.

Grid (``grid``): head blocks x group tiles on x, the batch on y and z. A program loops over
HEADS heads of its tile, so the loads of the next head are pipelined (num_stages) under the
maths of the current one, while head blocks keep enough programs for every SM at small batch.
Head blocks are the fastest grid axis: the programs in flight together read disjoint column
slices of the same rows, so each qkv row is fetched whole, and L2 serves the sectors two heads
share when head_dim * itemsize is not a multiple of 32 bytes.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from ..backends import DoesNotFit, interpreting
from ..layout import Groups, stats_dtype
from . import pools, target, tuning
from .grid import batch_grid, clip_id

MAX_SEQ = 128  # groups with seq_len <= max_seq(...) and no cls query come to this module

_INTERPRET = interpreting()
_MIN_TILE = 32  # rows of the smallest tile; also the cls partial-sum granularity (backward)
# The one launch config under TRITON_INTERPRET=1, where autotuning is very slow; BLOCK_M is
# raised to T_PAD for longer groups. Tests swap it to cover other tilings on the CPU.
INTERPRET_CONFIG = {"BLOCK_M": _MIN_TILE, "HEADS": 2}

WIDE_HEAD_DIM = 128  # the interpreter's bound for WIDE_MAX_SEQ (see max_seq)
WIDE_MAX_SEQ = 32
_NAMES = {"fwd": "_temporal_fwd_kernel", "bwd": "_temporal_bwd_kernel"}
_POOLS = {"fwd": pools.TEMPORAL_FWD, "bwd": pools.TEMPORAL_BWD}
_TUNE_KEY = ["S", "H", "HEAD_DIM", "CLS_KEY", "DOT_PRECISION", "TARGET"]  # + the dtypes; never batch or groups


def kept(kind: str, named: dict, dtype: torch.dtype) -> list[triton.Config]:
    """The configs kernel ``kind`` ("fwd", "bwd") tunes over for a launch of ``dtype``
    (``named``: its constexprs): its pool for the launch's BLOCK_D and dtype (``pools.py``) on
    the launch's target, tiles that hold at least one whole group, 128 rows only where nothing
    smaller does (at T = 8 they run one mostly masked program per SM). DoesNotFit when none is
    left."""
    t_pad = named["T_PAD"]
    pool = [e for e in _POOLS[kind].get(pools.key(named["BLOCK_D"], dtype, named["DOT_PRECISION"]), [])
            if e.config.kwargs["BLOCK_M"] >= t_pad]
    configs = tuning.keep(_NAMES[kind], pool, target.by_key(named["TARGET"]), dtype, named["HEAD_DIM"],
                          f", groups of {named['S']}")
    rows = max(64, t_pad, min(c.kwargs["BLOCK_M"] for c in configs))
    return [c for c in configs if c.kwargs["BLOCK_M"] <= rows]


def _tuned(kind: str):
    """Autotune over the kernel's pools, pruned to ``kept`` per launch and keyed on the group
    length, head count, head_dim, cls key, precision and target: no re-tuning per batch size.
    The interpreter runs INTERPRET_CONFIG instead."""
    if _INTERPRET:
        return lambda fn: fn
    configs = [e.config for pool in _POOLS[kind].values() for e in pool]
    return tuning.autotune(configs, _TUNE_KEY, lambda named: kept(kind, named, named["qkv_ptr"].dtype))


_max_seq: dict[tuple, int] = {}


def max_seq(head_dim: int, dtype: torch.dtype, device: torch.device) -> int:
    """The longest group this module takes (longer ones go to spatial.py): the longest padded
    group (a power of two up to MAX_SEQ) for which both kernels keep a config on the target.
    The interpreter, with no target named: MAX_SEQ, or WIDE_MAX_SEQ above WIDE_HEAD_DIM."""
    if _INTERPRET and not target.forced():
        return MAX_SEQ if head_dim <= WIDE_HEAD_DIM else WIDE_MAX_SEQ
    tgt = target.current(device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    precision = target.dot_precision(dtype, tgt)
    memo = (tgt.key, block_d, head_dim, dtype, precision)
    if memo not in _max_seq:
        _max_seq[memo] = 0
        for t_pad in (MAX_SEQ >> i for i in range(MAX_SEQ.bit_length())):
            named = dict(T_PAD=t_pad, S=t_pad, BLOCK_D=block_d, TARGET=tgt.key, HEAD_DIM=head_dim,
                         DOT_PRECISION=precision)
            try:
                kept("fwd", named, dtype), kept("bwd", named, dtype)
            except DoesNotFit:
                continue
            _max_seq[memo] = t_pad
            break
    return _max_seq[memo]


@triton.jit
def _program_ids(H, HEADS: tl.constexpr):
    """(first head, group tile, clip) of this program; see grid()."""
    head_blocks = tl.cdiv(H, HEADS)
    pid = tl.program_id(0)
    return (pid % head_blocks) * HEADS, pid // head_blocks, clip_id()


@triton.jit
def _tile_rows(pid_m, G, S, base, group_stride, pos_stride, T_PAD: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """qkv rows of a tile of whole groups, which of them are real, and the block-diagonal
    (same group, real key) mask of its scores."""
    r = tl.arange(0, BLOCK_M)
    g = pid_m * (BLOCK_M // T_PAD) + r // T_PAD
    p = r % T_PAD
    row = base + g * group_stride + p * pos_stride
    valid = (g < G) & (p < S)
    key_ok = ((r // T_PAD)[:, None] == (r // T_PAD)[None, :]) & (p < S)[None, :]
    return row.to(tl.int64), valid, key_ok


@triton.jit
def _scaled(x, scale_hi, scale_lo):
    """x * scale. Float arguments reach a kernel as fp32, so fp64 adds the rounding residue."""
    if x.dtype == tl.float64:
        x = x * scale_hi + x * scale_lo
    else:
        x = x * scale_hi
    return x


@_tuned("fwd")
@triton.jit(do_not_specialize=["B"])  # a new batch size must not compile a new kernel
def _temporal_fwd_kernel(
    qkv_ptr, out_ptr, lse_ptr,
    stride_qb, stride_ql, stride_ob, stride_ol, stride_lb, stride_ll,
    B, G, S, H, base, group_stride, pos_stride, scale_hi, scale_lo,
    CLS_KEY: tl.constexpr, HEAD_DIM: tl.constexpr, T_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, TARGET: tl.constexpr, BLOCK_M: tl.constexpr,
    HEADS: tl.constexpr,
):
    """out and lse of the groups in one tile, for heads [pid0 * HEADS, pid0 * HEADS + HEADS)."""
    h_begin, pid_m, b = _program_ids(H, HEADS)
    if b >= B:  # past the last clip (see grid.py)
        return
    row, valid, key_ok = _tile_rows(pid_m, G, S, base, group_stride, pos_stride, T_PAD, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    tile_ok = valid[:, None] & d_ok[None, :]
    D = H * HEAD_DIM
    clip = qkv_ptr + b * stride_qb
    qkv_rows = clip + row * stride_ql
    out_rows = out_ptr + b * stride_ob + (row - base) * stride_ol
    lse_rows = lse_ptr + b * stride_lb + (row - base) * stride_ll
    for h in range(h_begin, tl.minimum(h_begin + HEADS, H)):
        col = h * HEAD_DIM + d
        q = tl.load(qkv_rows[:, None] + col[None, :], mask=tile_ok, other=0.0)
        k = tl.load(qkv_rows[:, None] + (D + col)[None, :], mask=tile_ok, other=0.0)
        v = tl.load(qkv_rows[:, None] + (2 * D + col)[None, :], mask=tile_ok, other=0.0)
        s = _scaled(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), scale_hi, scale_lo)
        s = tl.where(key_ok, s, float("-inf"))
        m = tl.max(s, axis=1)
        if CLS_KEY:
            k_cls = tl.load(clip + D + col, mask=d_ok, other=0.0).to(ACC)
            v_cls = tl.load(clip + 2 * D + col, mask=d_ok, other=0.0).to(ACC)
            s_cls = _scaled(tl.sum(q.to(ACC) * k_cls[None, :], axis=1), scale_hi, scale_lo)
            m = tl.maximum(m, s_cls)
        p = tl.exp(s - m[:, None])
        l = tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        if CLS_KEY:
            p_cls = tl.exp(s_cls - m)
            l += p_cls
            acc += p_cls[:, None] * v_cls[None, :]
        tl.store(out_rows[:, None] + col[None, :], (acc * (1.0 / l)[:, None]).to(v.dtype), mask=tile_ok)
        tl.store(lse_rows + h, m + tl.log(l), mask=valid)


@_tuned("bwd")
@triton.jit(do_not_specialize=["B"])
def _temporal_bwd_kernel(
    qkv_ptr, dout_ptr, lse_ptr, dqkv_ptr, dcls_ptr,
    stride_qb, stride_ql, stride_db, stride_dl,
    stride_lb, stride_ll, stride_gb, stride_gl,
    B, G, S, H, base, group_stride, pos_stride, scale_hi, scale_lo, n_chunks,
    CLS_KEY: tl.constexpr, HEAD_DIM: tl.constexpr, T_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, TARGET: tl.constexpr, CLS_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, HEADS: tl.constexpr,
):
    """dq, dk, dv of the groups in one tile for HEADS heads, from P recomputed with the saved
    lse; with CLS_KEY also the partial cls dk/dv of each CLS_ROWS-row chunk of the tile.
    Every key of a group is in the tile, so delta = rowsum(dO∘O) comes from P and dP without
    reading out; each gradient is stored as soon as it is final, to free its registers."""
    h_begin, pid_m, b = _program_ids(H, HEADS)
    if b >= B:  # past the last clip (see grid.py)
        return
    row, valid, key_ok = _tile_rows(pid_m, G, S, base, group_stride, pos_stride, T_PAD, BLOCK_M)
    p_ok = key_ok & valid[:, None]  # also drops the padding query rows from dk and dv
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    tile_ok = valid[:, None] & d_ok[None, :]
    D = H * HEAD_DIM
    clip = qkv_ptr + b * stride_qb
    qkv_rows = clip + row * stride_ql
    dout_rows = dout_ptr + b * stride_db + (row - base) * stride_dl
    lse_rows = lse_ptr + b * stride_lb + (row - base) * stride_ll
    dqkv_rows = dqkv_ptr + b * stride_gb + row * stride_gl
    tl.static_assert(BLOCK_M % CLS_ROWS == 0)
    CHUNKS: tl.constexpr = BLOCK_M // CLS_ROWS
    chunk = pid_m * CHUNKS + tl.arange(0, CHUNKS)
    dcls_rows = dcls_ptr + (b * n_chunks + chunk) * (2 * D)
    chunk_ok = (chunk < n_chunks)[:, None] & d_ok[None, :]
    for h in range(h_begin, tl.minimum(h_begin + HEADS, H)):
        col = h * HEAD_DIM + d
        q = tl.load(qkv_rows[:, None] + col[None, :], mask=tile_ok, other=0.0)
        k = tl.load(qkv_rows[:, None] + (D + col)[None, :], mask=tile_ok, other=0.0)
        v = tl.load(qkv_rows[:, None] + (2 * D + col)[None, :], mask=tile_ok, other=0.0)
        do = tl.load(dout_rows[:, None] + col[None, :], mask=tile_ok, other=0.0)
        lse = tl.load(lse_rows + h, mask=valid, other=0.0)
        s = _scaled(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), scale_hi, scale_lo)
        p = tl.where(p_ok, tl.exp(s - lse[:, None]), 0.0)
        dv = tl.dot(tl.trans(p.to(v.dtype)), do, input_precision=DOT_PRECISION)
        tl.store(dqkv_rows[:, None] + (2 * D + col)[None, :], dv.to(q.dtype), mask=tile_ok)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        # delta = ΣP∘dP / ΣP: the division undoes lse's rounding, which ΣP = 1 would leave in
        # (all-equal large logits); padding rows (ΣP = 0) divide by 1.
        p_dp = tl.sum(p * dp, axis=1)
        p_sum = tl.sum(p, axis=1)
        if CLS_KEY:
            k_cls = tl.load(clip + D + col, mask=d_ok, other=0.0).to(ACC)
            v_cls = tl.load(clip + 2 * D + col, mask=d_ok, other=0.0).to(ACC)
            s_cls = _scaled(tl.sum(q.to(ACC) * k_cls[None, :], axis=1), scale_hi, scale_lo)
            p_cls = tl.where(valid, tl.exp(s_cls - lse), 0.0)
            dp_cls = tl.sum(do.to(ACC) * v_cls[None, :], axis=1)
            p_dp += p_cls * dp_cls
            p_sum += p_cls
        delta = p_dp / tl.where(valid, p_sum, 1.0)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dk = _scaled(tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION), scale_hi, scale_lo)
        tl.store(dqkv_rows[:, None] + (D + col)[None, :], dk.to(q.dtype), mask=tile_ok)
        dq = tl.dot(ds, k, input_precision=DOT_PRECISION)
        if CLS_KEY:
            ds_cls = p_cls * (dp_cls - delta)
            dq += ds_cls[:, None] * k_cls[None, :]
            dk_cls = tl.sum(tl.reshape(ds_cls[:, None] * q.to(ACC), (CHUNKS, CLS_ROWS, BLOCK_D)), axis=1)
            dv_cls = tl.sum(tl.reshape(p_cls[:, None] * do.to(ACC), (CHUNKS, CLS_ROWS, BLOCK_D)), axis=1)
            tl.store(dcls_rows[:, None] + col[None, :], _scaled(dk_cls, scale_hi, scale_lo), mask=chunk_ok)
            tl.store(dcls_rows[:, None] + (D + col)[None, :], dv_cls, mask=chunk_ok)
        tl.store(dqkv_rows[:, None] + col[None, :], _scaled(dq, scale_hi, scale_lo).to(q.dtype), mask=tile_ok)


def _common(dtype: torch.dtype, device: torch.device, groups: Groups, scale: float):
    """Launch arguments shared by both kernels: (row args, constexprs, grid, T_PAD)."""
    t_pad = triton.next_power_of_2(groups.seq_len)
    tgt = target.current(device)
    hi = struct.unpack("f", struct.pack("f", scale))[0]  # scale rounded to fp32
    args = (groups.batch, groups.num_groups, groups.seq_len, groups.num_heads, groups.base,
            groups.group_stride, groups.pos_stride, hi, scale - hi)
    consts = dict(
        CLS_KEY=groups.cls_key, HEAD_DIM=groups.head_dim, T_PAD=t_pad,
        BLOCK_D=max(16, triton.next_power_of_2(groups.head_dim)),
        ACC=tl.float64 if dtype == torch.float64 else tl.float32,
        DOT_PRECISION=target.dot_precision(dtype, tgt), TARGET=tgt.key,
    )
    if _INTERPRET:
        consts.update(BLOCK_M=max(INTERPRET_CONFIG["BLOCK_M"], t_pad), HEADS=INTERPRET_CONFIG["HEADS"])

    return args, consts, lambda meta: grid(groups, t_pad, meta["BLOCK_M"], meta["HEADS"]), t_pad


def grid(groups: Groups, t_pad: int, block_m: int, heads: int) -> tuple[int, int, int]:
    """The launch grid: head blocks x group tiles per clip (head blocks fastest, see the module
    docstring), the batch over y and z (``grid.batch_grid``)."""
    per_clip = triton.cdiv(groups.num_heads, heads) * triton.cdiv(groups.num_groups, block_m // t_pad)
    return batch_grid(per_clip, groups.batch, f"{groups.num_groups} temporal groups of {groups.num_heads} heads")


def plan(groups: Groups, dtype: torch.dtype, device: torch.device, backward: bool = True) -> list[tuple[str, list]]:
    """The kernels of a call (forward, and backward), each with the configs it tunes over
    (``kept``; DoesNotFit when one keeps none)."""
    _, consts, _, _ = _common(dtype, device, groups, 1.0)
    named = {"S": groups.seq_len, **consts}
    return [(_NAMES[kind], kept(kind, named, dtype)) for kind in ("fwd", "bwd")[:2 if backward else 1]]


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def temporal_fwd(qkv: torch.Tensor, groups: Groups, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, N·T, H·Dh) contiguous, dtype of qkv; lse (B, N·T, H) float32 (float64 for fp64
    input), the natural log-sum-exp of each query row's scaled scores."""
    assert not groups.cls_query and groups.seq_len <= max_seq(groups.head_dim, qkv.dtype, qkv.device)
    assert qkv.stride(-1) == 1
    assert qkv.shape[1] == groups.base + groups.num_patches
    bsz, rows, dim = qkv.shape[0], groups.num_patches, groups.num_heads * groups.head_dim
    acc_dtype = stats_dtype(qkv.dtype)
    out = torch.empty((bsz, rows, dim), dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty((bsz, rows, groups.num_heads), dtype=acc_dtype, device=qkv.device)
    args, consts, grid, _ = _common(qkv.dtype, qkv.device, groups, scale)
    _temporal_fwd_kernel[grid](
        qkv, out, lse, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
        lse.stride(0), lse.stride(1), *args, **consts)
    return out, lse


def temporal_bwd(dout: torch.Tensor, qkv: torch.Tensor, lse: torch.Tensor, groups: Groups,
                 scale: float) -> torch.Tensor:
    """dqkv: a new contiguous tensor of qkv's shape and dtype, in qkv's layout (q|k|v). Needs
    no forward output: delta is recomputed from the tile (see the kernel)."""
    assert not groups.cls_query and groups.seq_len <= max_seq(groups.head_dim, qkv.dtype, qkv.device)
    assert qkv.stride(-1) == 1
    assert qkv.shape[1] == groups.base + groups.num_patches
    dout = _unit_last(dout)
    assert lse.stride(-1) == 1
    bsz, dim = qkv.shape[0], groups.num_heads * groups.head_dim
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    args, consts, grid, t_pad = _common(qkv.dtype, qkv.device, groups, scale)
    # The cls key/value of a clip gets gradient from all G groups. Without atomics (and so
    # deterministically), each program writes one fp32 (fp64) partial dk/dv per chunk of
    # CLS_ROWS rows of its tile, and torch sums the chunks below in a fixed order. Chunks
    # of the smallest tile keep this buffer independent of the autotuned BLOCK_M.
    cls_rows = max(_MIN_TILE, t_pad)
    n_chunks = triton.cdiv(groups.num_groups, cls_rows // t_pad) if groups.cls_key else 0
    dcls = torch.empty((bsz, n_chunks, 2, dim), dtype=lse.dtype, device=qkv.device) if groups.cls_key else dqkv
    _temporal_bwd_kernel[grid](
        qkv, dout, lse, dqkv, dcls,
        qkv.stride(0), qkv.stride(1), dout.stride(0), dout.stride(1), lse.stride(0), lse.stride(1), dqkv.stride(0), dqkv.stride(1),
        *args, n_chunks, CLS_ROWS=cls_rows, **consts)
    if groups.base:  # row 0, the cls token: its query takes no part in these groups
        dqkv[:, 0].zero_()
        if groups.cls_key:
            dqkv[:, 0, dim:] = dcls.sum(1).flatten(1)
    return dqkv
