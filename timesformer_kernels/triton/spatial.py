"""Flash-style Triton attention over groups of any length, read in place from qkv.

Serves spatial attention (S = N patches of a frame, plus the cls token as key and query)
and temporal attention with T > 128 (S = T, cls as key only, or no cls). Rows of qkv and
out follow ``layout.py``; nothing is gathered or copied before the kernels run.

The cls token enters as index 0 of a group's key (HAS_CLS_KEY) or query (HAS_CLS_QUERY)
sequence: row 0 of the first tile or key block, whose row addresses select it (the patches
shift by one, so 1 + 196 or 1 + 784 rows need no more 64/128 tiles than 196 or 784 do, and
every logit comes out of the same tl.dot, so the forward and backward agree on it bit for
bit). Only the dK/dV kernel's query loop takes the cls query as a seed step with vector ops.

Backward recomputes the probabilities from the saved log-sum-exp. Where every query of a
group fits one tile (1 + 196 rows at TimeSformer-base), Dh <= 64 and that kernel compiles clean
for the target (``pools.py``: sm_90 in 16-bit, every NVIDIA target for groups up to 128), one
kernel does it all (``whole_group``): a program holds the group's queries, loops over its keys,
accumulates dQ and stores each key block's dK and dV as soon as they are final, so qkv,
out and dout are read once. Otherwise dQ and dK/dV are separate kernels. Either way each
program owns the gradient rows it writes (no atomics). The cls token is shared by the G
groups of a clip: each program writes its group's share of the cls gradient to a small
(B, G, 3·H·Dh) buffer, summed over G in torch (deterministic).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ..backends import DoesNotFit, interpreting
from ..layout import Groups, stats_dtype
from . import pools, target, tuning
from .grid import batch_grid, clip_id

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
# The backward's per-query statistics (delta, log2-domain lse) of one (batch, group, head):
# the cls query at STATS_LEAD - 1, patch query i at STATS_LEAD + i, zeros up to the row's end
# (a multiple of the largest query tile), so dK/dV loads whole 16-byte-aligned blocks of them
# without a mask.
STATS_LEAD: tl.constexpr = tl.constexpr(16)
_STATS_TILE = 128  # a multiple of every dK/dV BLOCK_M: whole query blocks stay in the row
WIDE_HEAD_DIM = 128  # head dims above it (BLOCK_D = 256) take the wide configs and no peeled key tail
_PEEL_MAX_D: tl.constexpr = tl.constexpr(WIDE_HEAD_DIM)  # the same bound, as kernels see it
SHORT_HEAD_DIM = 64  # head dims up to it can also hold a whole 197-row group in one tile
# Never the batch size: a new batch must not re-tune or recompile.
_TUNE_KEY = ["seq_len", "HEAD_DIM", "HAS_CLS_KEY", "HAS_CLS_QUERY", "DOT_PRECISION", "TARGET"]  # + the dtypes


_NAMES = {"fwd": "_spatial_fwd_kernel", "dq": "_spatial_bwd_dq_kernel", "dkdv": "_spatial_bwd_dkdv_kernel",
          "group": "_spatial_bwd_group_kernel"}
_POOLS = {"fwd": pools.SPATIAL_FWD, "dq": pools.SPATIAL_DQ, "dkdv": pools.SPATIAL_DKDV, "group": pools.SPATIAL_GROUP}
# Whole-group backward: every query of a group in one tile of at most this many rows.
GROUP_BWD_MAX_ROWS = 256


def kept(kind: str, named: dict, dtype: torch.dtype) -> list[triton.Config]:
    """The configs kernel ``kind`` ("fwd", "dq", "dkdv", "group") tunes over for a launch of
    ``dtype`` (``named``: its constexprs): its pool for the launch's BLOCK_D and dtype
    (``pools.py``) on the launch's target; the whole-group kernel only with the warps for its
    query rows (8 for 128-256, 4 up to 128: fewer rows on 8 warps would compute them twice).
    DoesNotFit when none is left."""
    pool = _POOLS[kind].get(pools.key(named["BLOCK_D"], dtype, named["DOT_PRECISION"]), [])
    if kind == "group":
        rows = named["BLOCK_M"]
        pool = [e for e in pool
                if (e.config.num_warps == 8 and rows >= 128) or (e.config.num_warps == 4 and rows <= 128)]
    return tuning.keep(_NAMES[kind], pool, target.by_key(named["TARGET"]), dtype, named["HEAD_DIM"])


def _tuned(kind: str):
    """Autotune over the kernel's pools, pruned to ``kept`` per launch. The interpreter gets one
    small config instead, because it autotunes by running every config and 16-row tiles
    already exercise the multi-tile paths at small N."""
    if interpreting():
        meta = {"BLOCK_N": 16} if kind == "group" else {"BLOCK_M": 16, "BLOCK_N": 16}
        return triton.autotune([triton.Config(meta, num_warps=4, num_stages=1)], key=_TUNE_KEY)
    configs = [e.config for pool in _POOLS[kind].values() for e in pool]
    return tuning.autotune(configs, _TUNE_KEY, lambda named: kept(kind, named, named["qkv"].dtype))


@triton.jit
def _group_rows(idx, g_row, pos_stride, base, HAS_CLS: tl.constexpr):
    """qkv rows (int64) of sequence indices idx of the group whose first patch row is
    base + g_row; index 0 is the cls token (row 0) when HAS_CLS."""
    if HAS_CLS:
        rows = tl.where(idx == 0, 0, base + g_row + (idx - 1) * pos_stride)
    else:
        rows = base + g_row + idx * pos_stride
    return rows.to(tl.int64)


@triton.jit
def _load_rows(ptr, rows, stride_row, col, offs_d, row_ok, HEAD_DIM: tl.constexpr):
    """(len(rows), BLOCK_D) tile of channels col .. col + HEAD_DIM, zero where masked;
    row_ok None: every row is in range."""
    if row_ok is None:
        mask = (offs_d < HEAD_DIM)[None, :]
    else:
        mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    return tl.load(ptr + rows[:, None] * stride_row + (col + offs_d)[None, :], mask=mask, other=0.0)


@triton.jit
def _fwd_step(q, m_i, l_i, acc, qkv_b, start_n, seq_len, g_row, pos_stride, base, stride_qkv_l, k_col, v_col,
              offs_d, qk_scale, HEAD_DIM: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CLS: tl.constexpr):
    """One key block of the online softmax: the new (m_i, l_i, acc). Only the last, partial
    block is MASKED: the loop over the whole blocks before it carries no masks. CLS: key 0 is
    the cls token, so keys run to seq_len + 1."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_rows = _group_rows(offs_n, g_row, pos_stride, base, CLS)
    k_ok = offs_n < seq_len + CLS if MASKED else None
    k = _load_rows(qkv_b, kv_rows, stride_qkv_l, k_col, offs_d, k_ok, HEAD_DIM)
    # Unscaled scores: the scale goes into one FMA with the max (qk_scale >= 0, so max(s)·c == max(s·c)).
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(ACC)
    if MASKED:  # padded keys load as zeros; masked after scaling, since -inf · 0 is NaN at scale 0
        m_new = tl.maximum(m_i, tl.max(tl.where(k_ok[None, :], s, float("-inf")), axis=1) * qk_scale)
        p = tl.where(k_ok[None, :], tl.exp2(s * qk_scale - m_new[:, None]), 0.0)
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = _load_rows(qkv_b, kv_rows, stride_qkv_l, v_col, offs_d, k_ok, HEAD_DIM)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION).to(ACC)
    return m_new, l_i, acc


@triton.jit
def _store_row0(ptr, tile, offs, offs_d, d_ok):
    """Stores row 0 of ``tile`` (the cls token's, index 0 of ``offs``) at ``ptr + offs_d``: a
    masked store through one broadcast row pointer, instead of reducing the tile across rows."""
    tl.store(ptr + tl.zeros_like(offs)[:, None] + offs_d[None, :], tile, mask=(offs == 0)[:, None] & d_ok)


@triton.jit
def _dq_step(dq, q, do, lse2, row_delta, qkv_b, start_n, seq_len, g_row, pos_stride, base, stride_qkv_l, k_col,
             v_col, offs_d, qk_scale, dk_ptr, cls_k_ptr, sm_scale, HEAD_DIM: tl.constexpr, ACC: tl.constexpr,
             DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DKDV: tl.constexpr,
             CLS: tl.constexpr):
    """One key block of dQ: dq + dS·K (MASKED and CLS as in _fwd_step). DKDV (the tile holds
    every query of the group): the block's dK and dV are final here, stored at ``dk_ptr``
    (dqkv with its batch and the head's dK column applied; rows of 3·H·Dh, dV H·Dh after dK),
    the cls key's at ``cls_k_ptr`` (its group's fp32 share of the cls gradient, dK part)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_rows = _group_rows(offs_n, g_row, pos_stride, base, CLS)
    k_ok = offs_n < seq_len + CLS if MASKED else None
    k = _load_rows(qkv_b, kv_rows, stride_qkv_l, k_col, offs_d, k_ok, HEAD_DIM)
    v = _load_rows(qkv_b, kv_rows, stride_qkv_l, v_col, offs_d, k_ok, HEAD_DIM)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(ACC)
    p = tl.exp2(s * qk_scale - lse2[:, None])
    if MASKED:  # padded keys load as zeros, so their score is 0, not -inf: mask p itself
        p = tl.where(k_ok[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION).to(ACC)
    ds = p * (dp - row_delta[:, None])
    if DKDV:  # padded queries have q = dO = 0: they add nothing
        d_ok = (offs_d < HEAD_DIM)[None, :]
        is_patch = offs_n >= CLS if k_ok is None else k_ok & (offs_n >= CLS)
        ptrs = dk_ptr + kv_rows[:, None] * (3 * (v_col - k_col)) + offs_d[None, :]
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION).to(ACC)
        tl.store(ptrs + (v_col - k_col), dv.to(dk_ptr.dtype.element_ty), mask=is_patch[:, None] & d_ok)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION).to(ACC) * sm_scale
        tl.store(ptrs, dk.to(dk_ptr.dtype.element_ty), mask=is_patch[:, None] & d_ok)
        if CLS:
            _store_row0(cls_k_ptr, dk, offs_n, offs_d, d_ok)
            _store_row0(cls_k_ptr + (v_col - k_col), dv, offs_n, offs_d, d_ok)
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION).to(ACC)


@triton.jit
def _scales(scale, ACC: tl.constexpr):
    """(scale, scale·log2(e), log2(e)) as ACC scalars. Scores are kept in the log2 domain
    (exp2 is the hardware exp); a bare float would enter as float32 and cost the float64
    path (interpreter) its precision."""
    log2e = tl.full([], LOG2E, ACC)
    sm_scale = tl.full([], scale, ACC)
    return sm_scale, sm_scale * log2e, log2e


@triton.jit
def _program_ids(num_tiles, num_heads, num_groups):
    """(tile, bgh, bg, b, g, h) of this program in a ``grid``: x spans a clip's tiles x heads
    x groups, tile index fastest, so the tiles of one (clip, group, head) run together and
    share the other side's rows in L2; the clip b comes from y and z (``grid.py``). bg and
    bgh number the (clip, group) and (clip, group, head) in row-major order."""
    pid = tl.program_id(0)
    tile = pid % num_tiles
    gh = pid // num_tiles
    h = gh % num_heads
    g = gh // num_heads
    b = clip_id()
    bg = b * num_groups + g
    return tile, bg * num_heads + h, bg, b, g, h


@triton.jit
def _query_tile(qkv_b, out, dout, lse, cls_out, dcls_out, cls_lse, offs_m, offs_d, b, g, bg, h, log2e, stride_qkv_l,
                stride_do_b, stride_do_l, stride_dcls_b, stride_dcls_g, num_heads, num_groups, seq_len, g_row,
                pos_stride, base, HEAD_DIM: tl.constexpr, HAS_CLS_QUERY: tl.constexpr, ACC: tl.constexpr):
    """What the backward needs of a tile of queries (index 0: the cls query when HAS_CLS_QUERY):
    (q, dO, delta = rowsum(dO·O), log2-domain lse, qkv rows); zeros past the group's end."""
    hd = num_heads * HEAD_DIM
    d_ok = offs_d < HEAD_DIM
    q_rows = _group_rows(offs_m, g_row, pos_stride, base, HAS_CLS_QUERY)
    q_ok = offs_m < seq_len + HAS_CLS_QUERY
    is_patch = q_ok & (offs_m >= HAS_CLS_QUERY)
    out_rows = q_rows - base
    num_patches = num_groups * seq_len
    q = _load_rows(qkv_b, q_rows, stride_qkv_l, h * HEAD_DIM, offs_d, q_ok, HEAD_DIM)
    do = _load_rows(dout + b.to(tl.int64) * stride_do_b, out_rows, stride_do_l, h * HEAD_DIM, offs_d, is_patch,
                    HEAD_DIM).to(q.dtype)
    o = _load_rows(out + b.to(tl.int64) * num_patches * hd, out_rows, hd, h * HEAD_DIM, offs_d, is_patch,
                   HEAD_DIM).to(ACC)
    row_lse = tl.load(lse + (b.to(tl.int64) * num_patches + out_rows) * num_heads + h, mask=is_patch, other=0.0)
    if HAS_CLS_QUERY:
        is_cls = offs_m == 0
        do_cls = tl.load(dcls_out + b.to(tl.int64) * stride_dcls_b + g * stride_dcls_g + h * HEAD_DIM + offs_d,
                         mask=d_ok, other=0.0).to(q.dtype)
        o_cls = tl.load(cls_out + bg.to(tl.int64) * hd + h * HEAD_DIM + offs_d, mask=d_ok, other=0.0).to(ACC)
        do = tl.where(is_cls[:, None], do_cls[None, :], do)
        o = tl.where(is_cls[:, None], o_cls[None, :], o)
        row_lse = tl.where(is_cls, tl.load(cls_lse + bg.to(tl.int64) * num_heads + h), row_lse)
    return q, do, tl.sum(do.to(ACC) * o, axis=1), row_lse * log2e, q_rows


@triton.jit
def _store_dq(dq, dqkv, cls_grad, q_rows, offs_m, offs_d, q_ok, b, bg, h, rows_per_clip, hd,
              HEAD_DIM: tl.constexpr, HAS_CLS_QUERY: tl.constexpr):
    """Stores a finished (scaled) dQ tile: patch rows into dqkv, the cls query's row (index 0)
    into its group's fp32 share of the cls gradient."""
    d_ok = (offs_d < HEAD_DIM)[None, :]
    is_patch = q_ok & (offs_m >= HAS_CLS_QUERY)
    dqkv_b = dqkv + b.to(tl.int64) * rows_per_clip * 3 * hd
    tl.store(dqkv_b + q_rows[:, None] * (3 * hd) + (h * HEAD_DIM + offs_d)[None, :], dq.to(dqkv.dtype.element_ty),
             mask=is_patch[:, None] & d_ok)
    if HAS_CLS_QUERY:
        cls_q = cls_grad + bg.to(tl.int64) * 3 * hd + h * HEAD_DIM
        _store_row0(cls_q, dq, offs_m, offs_d, d_ok)


@triton.jit
def _dq_keys(q, do, lse2, row_delta, qkv_b, dqkv, cls_grad, b, bg, h, seq_len, g_row, pos_stride, base,
             stride_qkv_l, rows_per_clip, hd, qk_scale, sm_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             HAS_CLS_KEY: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, DKDV: tl.constexpr):
    """dQ (unscaled) of a tile of queries over every key of its group (the cls key first) in
    BLOCK_N blocks. DKDV: also every key's dK and dV (see _dq_step)."""
    offs_d = tl.arange(0, BLOCK_D)
    k_col, v_col = hd + h * HEAD_DIM, 2 * hd + h * HEAD_DIM
    dk_ptr = dqkv + b.to(tl.int64) * rows_per_clip * 3 * hd + k_col
    cls_k_ptr = cls_grad + bg.to(tl.int64) * 3 * hd + k_col
    num_k = seq_len + HAS_CLS_KEY  # the cls key is key 0, as in the forward
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    # Whole key blocks unmasked, the tail peeled, as in the forward; not at BLOCK_D = 256 nor with
    # DKDV, where a second copy of the step spills (its loop-invariant dot operands live across both).
    if BLOCK_D <= _PEEL_MAX_D and not DKDV:
        whole = num_k - num_k % BLOCK_N
        for start_n in range(0, whole, BLOCK_N):
            dq = _dq_step(dq, q, do, lse2, row_delta, qkv_b, start_n, seq_len, g_row, pos_stride, base, stride_qkv_l,
                          k_col, v_col, offs_d, qk_scale, dk_ptr, cls_k_ptr, sm_scale, HEAD_DIM, ACC, DOT_PRECISION,
                          BLOCK_N, False, DKDV, HAS_CLS_KEY)
        if whole < num_k:
            dq = _dq_step(dq, q, do, lse2, row_delta, qkv_b, whole, seq_len, g_row, pos_stride, base, stride_qkv_l,
                          k_col, v_col, offs_d, qk_scale, dk_ptr, cls_k_ptr, sm_scale, HEAD_DIM, ACC, DOT_PRECISION,
                          BLOCK_N, True, DKDV, HAS_CLS_KEY)
    else:
        for start_n in range(0, num_k, BLOCK_N):
            dq = _dq_step(dq, q, do, lse2, row_delta, qkv_b, start_n, seq_len, g_row, pos_stride, base, stride_qkv_l,
                          k_col, v_col, offs_d, qk_scale, dk_ptr, cls_k_ptr, sm_scale, HEAD_DIM, ACC, DOT_PRECISION,
                          BLOCK_N, True, DKDV, HAS_CLS_KEY)
    return dq


@_tuned("fwd")
@triton.jit(do_not_specialize=["batch"])  # a new batch size must not compile a new kernel
def _spatial_fwd_kernel(
    qkv, out, lse, cls_out, cls_lse,
    stride_qkv_b, stride_qkv_l,
    batch, num_heads, num_groups, seq_len, group_stride, pos_stride, base, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_CLS_KEY: tl.constexpr,
    HAS_CLS_QUERY: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, TARGET: tl.constexpr,
    NEGATE_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One BLOCK_M tile of a group's queries against all its keys (online softmax). A negative
    scale runs as NEGATE_Q with |scale| (exact), so the key loop may scale the max, not every score."""
    pid_m, bgh, bg, b, g, h = _program_ids(tl.cdiv(seq_len + HAS_CLS_QUERY, BLOCK_M), num_heads, num_groups)
    if b >= batch:  # past the last clip (grid.py)
        return
    hd = num_heads * HEAD_DIM
    qkv_b = qkv + b.to(tl.int64) * stride_qkv_b
    g_row = g * group_stride
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_rows = _group_rows(offs_m, g_row, pos_stride, base, HAS_CLS_QUERY)
    q_ok = offs_m < seq_len + HAS_CLS_QUERY
    q = _load_rows(qkv_b, q_rows, stride_qkv_l, h * HEAD_DIM, offs_d, q_ok, HEAD_DIM)
    if NEGATE_Q:
        q = -q
    _, qk_scale, log2e = _scales(scale, ACC)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    k_col, v_col = hd + h * HEAD_DIM, 2 * hd + h * HEAD_DIM
    num_k = seq_len + HAS_CLS_KEY  # the cls key is key 0: its logit comes from the same dot as the rest
    if BLOCK_D <= _PEEL_MAX_D:  # whole key blocks unmasked, the tail peeled
        whole = num_k - num_k % BLOCK_N
        for start_n in range(0, whole, BLOCK_N):
            m_i, l_i, acc = _fwd_step(q, m_i, l_i, acc, qkv_b, start_n, seq_len, g_row, pos_stride, base,
                                      stride_qkv_l, k_col, v_col, offs_d, qk_scale, HEAD_DIM, ACC, DOT_PRECISION,
                                      BLOCK_N, False, HAS_CLS_KEY)
        if whole < num_k:
            m_i, l_i, acc = _fwd_step(q, m_i, l_i, acc, qkv_b, whole, seq_len, g_row, pos_stride, base,
                                      stride_qkv_l, k_col, v_col, offs_d, qk_scale, HEAD_DIM, ACC, DOT_PRECISION,
                                      BLOCK_N, True, HAS_CLS_KEY)
    else:  # BLOCK_D = 256: a second copy of the loop body spills, so every block is masked
        for start_n in range(0, num_k, BLOCK_N):
            m_i, l_i, acc = _fwd_step(q, m_i, l_i, acc, qkv_b, start_n, seq_len, g_row, pos_stride, base,
                                      stride_qkv_l, k_col, v_col, offs_d, qk_scale, HEAD_DIM, ACC, DOT_PRECISION,
                                      BLOCK_N, True, HAS_CLS_KEY)

    acc = acc / l_i[:, None]
    row_lse = (m_i + tl.log2(l_i)) / log2e  # natural log, as the contract says
    out_rows = q_rows - base  # row of out/lse, see layout.py (meaningless for the cls query)
    num_patches = num_groups * seq_len
    is_patch = q_ok & (offs_m >= HAS_CLS_QUERY)
    d_ok = (offs_d < HEAD_DIM)[None, :]
    o = acc.to(out.dtype.element_ty)
    out_b = out + b.to(tl.int64) * num_patches * hd
    tl.store(out_b + out_rows[:, None] * hd + (h * HEAD_DIM + offs_d)[None, :], o, mask=is_patch[:, None] & d_ok)
    tl.store(lse + (b.to(tl.int64) * num_patches + out_rows) * num_heads + h, row_lse, mask=is_patch)
    if HAS_CLS_QUERY:  # the cls query's row to its (B, G) slot
        _store_row0(cls_out + bg.to(tl.int64) * hd + h * HEAD_DIM, o, offs_m, offs_d, d_ok)
        tl.store(cls_lse + bg.to(tl.int64) * num_heads + h + tl.zeros_like(offs_m), row_lse, mask=offs_m == 0)


@_tuned("dq")
@triton.jit(do_not_specialize=["batch"])
def _spatial_bwd_dq_kernel(
    qkv, out, dout, lse, cls_out, dcls_out, cls_lse, dqkv, cls_grad, delta, lse2_rows,
    stride_qkv_b, stride_qkv_l, stride_do_b, stride_do_l, stride_dcls_b, stride_dcls_g,
    batch, num_heads, num_groups, seq_len, group_stride, pos_stride, base, scale, stats_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_CLS_KEY: tl.constexpr,
    HAS_CLS_QUERY: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, TARGET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one BLOCK_M tile of queries; also saves delta = rowsum(dO·O) and lse·log2(e)
    for the dK/dV kernel, which runs after it (saves a preprocess launch and a second read
    of dO), in the STATS_LEAD layout."""
    num_q = seq_len + HAS_CLS_QUERY
    pid_m, bgh, bg, b, g, h = _program_ids(tl.cdiv(num_q, BLOCK_M), num_heads, num_groups)
    if b >= batch:
        return
    hd = num_heads * HEAD_DIM
    qkv_b = qkv + b.to(tl.int64) * stride_qkv_b
    g_row = g * group_stride
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = offs_m < num_q
    sm_scale, qk_scale, log2e = _scales(scale, ACC)
    q, do, row_delta, lse2, q_rows = _query_tile(
        qkv_b, out, dout, lse, cls_out, dcls_out, cls_lse, offs_m, offs_d, b, g, bg, h, log2e, stride_qkv_l,
        stride_do_b, stride_do_l, stride_dcls_b, stride_dcls_g, num_heads, num_groups, seq_len, g_row, pos_stride,
        base, HEAD_DIM, HAS_CLS_QUERY, ACC)
    num_patches = num_groups * seq_len
    stats = bgh.to(tl.int64) * stats_stride + STATS_LEAD - HAS_CLS_QUERY + offs_m
    tl.store(delta + stats, row_delta, mask=q_ok)
    tl.store(lse2_rows + stats, lse2, mask=q_ok)

    dq = _dq_keys(q, do, lse2, row_delta, qkv_b, dqkv, cls_grad, b, bg, h, seq_len, g_row, pos_stride, base,
                  stride_qkv_l, num_patches + base, hd, qk_scale, sm_scale, HEAD_DIM, BLOCK_D, HAS_CLS_KEY, ACC,
                  DOT_PRECISION, BLOCK_M, BLOCK_N, False)

    _store_dq(dq * sm_scale, dqkv, cls_grad, q_rows, offs_m, offs_d, q_ok, b, bg, h, num_patches + base, hd,
              HEAD_DIM, HAS_CLS_QUERY)


@_tuned("group")
@triton.jit(do_not_specialize=["batch"])
def _spatial_bwd_group_kernel(
    qkv, out, dout, lse, cls_out, dcls_out, cls_lse, dqkv, cls_grad,
    stride_qkv_b, stride_qkv_l, stride_do_b, stride_do_l, stride_dcls_b, stride_dcls_g,
    batch, num_heads, num_groups, seq_len, group_stride, pos_stride, base, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_CLS_KEY: tl.constexpr,
    HAS_CLS_QUERY: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, TARGET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The whole backward of one (clip, group, head) whose queries all fit one BLOCK_M tile:
    dQ of every query, and block by block the final dK and dV of the keys. Reads qkv, out and
    dout once (the op's floor) and computes the scores once, where the dQ + dK/dV pair reads
    and computes them twice."""
    _, _, bg, b, g, h = _program_ids(1, num_heads, num_groups)
    if b >= batch:
        return
    hd = num_heads * HEAD_DIM
    qkv_b = qkv + b.to(tl.int64) * stride_qkv_b
    g_row = g * group_stride
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    sm_scale, qk_scale, log2e = _scales(scale, ACC)
    q, do, row_delta, lse2, q_rows = _query_tile(
        qkv_b, out, dout, lse, cls_out, dcls_out, cls_lse, offs_m, offs_d, b, g, bg, h, log2e, stride_qkv_l,
        stride_do_b, stride_do_l, stride_dcls_b, stride_dcls_g, num_heads, num_groups, seq_len, g_row, pos_stride,
        base, HEAD_DIM, HAS_CLS_QUERY, ACC)
    rows_per_clip = num_groups * seq_len + base
    dq = _dq_keys(q, do, lse2, row_delta, qkv_b, dqkv, cls_grad, b, bg, h, seq_len, g_row, pos_stride, base,
                  stride_qkv_l, rows_per_clip, hd, qk_scale, sm_scale, HEAD_DIM, BLOCK_D, HAS_CLS_KEY, ACC,
                  DOT_PRECISION, BLOCK_M, BLOCK_N, True)
    _store_dq(dq * sm_scale, dqkv, cls_grad, q_rows, offs_m, offs_d, offs_m < seq_len + HAS_CLS_QUERY, b, bg, h,
              rows_per_clip, hd, HEAD_DIM, HAS_CLS_QUERY)


@_tuned("dkdv")
@triton.jit(do_not_specialize=["batch"])
def _spatial_bwd_dkdv_kernel(
    qkv, dout, dcls_out, dqkv, cls_grad, delta, lse2_rows,
    stride_qkv_b, stride_qkv_l, stride_do_b, stride_do_l, stride_dcls_b, stride_dcls_g,
    batch, num_heads, num_groups, seq_len, group_stride, pos_stride, base, scale, stats_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_CLS_KEY: tl.constexpr,
    HAS_CLS_QUERY: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, TARGET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK and dV of one BLOCK_N tile of a group's keys, looping over all its queries.
    Works on transposed scores (keys x queries) so both products accumulate without
    transposing the probabilities."""
    num_k = seq_len + HAS_CLS_KEY
    pid_n, bgh, bg, b, g, h = _program_ids(tl.cdiv(num_k, BLOCK_N), num_heads, num_groups)
    if b >= batch:
        return
    hd = num_heads * HEAD_DIM
    qkv_b = qkv + b.to(tl.int64) * stride_qkv_b
    g_row = g * group_stride
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kv_rows = _group_rows(offs_n, g_row, pos_stride, base, HAS_CLS_KEY)
    k_ok = offs_n < num_k
    k = _load_rows(qkv_b, kv_rows, stride_qkv_l, hd + h * HEAD_DIM, offs_d, k_ok, HEAD_DIM)
    v = _load_rows(qkv_b, kv_rows, stride_qkv_l, 2 * hd + h * HEAD_DIM, offs_d, k_ok, HEAD_DIM)
    num_patches = num_groups * seq_len
    stats = bgh.to(tl.int64) * stats_stride + STATS_LEAD  # patch query 0
    delta_g = delta + stats
    lse2_g = lse2_rows + stats
    sm_scale, qk_scale, _ = _scales(scale, ACC)

    if HAS_CLS_QUERY:
        q_cls = tl.load(qkv_b + h * HEAD_DIM + offs_d, mask=d_ok, other=0.0).to(ACC)
        do_cls = tl.load(dcls_out + b.to(tl.int64) * stride_dcls_b + g * stride_dcls_g + h * HEAD_DIM + offs_d,
                         mask=d_ok, other=0.0).to(ACC)
        p_cls = tl.exp2(tl.sum(k.to(ACC) * q_cls[None, :], axis=1) * qk_scale - tl.load(lse2_g - 1))
        ds_cls = p_cls * (tl.sum(v.to(ACC) * do_cls[None, :], axis=1) - tl.load(delta_g - 1))
        dv = p_cls[:, None] * do_cls[None, :]
        dk = ds_cls[:, None] * q_cls[None, :]
    else:
        dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
        dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)

    do_b = dout + b.to(tl.int64) * stride_do_b
    for start_m in range(0, seq_len, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ok = offs_m < seq_len
        q_rows = _group_rows(offs_m, g_row, pos_stride, base, False)
        q = _load_rows(qkv_b, q_rows, stride_qkv_l, h * HEAD_DIM, offs_d, q_ok, HEAD_DIM)
        do = _load_rows(do_b, q_rows - base, stride_do_l, h * HEAD_DIM, offs_d, q_ok, HEAD_DIM).to(q.dtype)
        # Padded queries read delta = lse = 0 (p = 1) but have q = dO = 0: they add nothing.
        lse2 = tl.load(lse2_g + offs_m)
        row_delta = tl.load(delta_g + offs_m)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION).to(ACC) * qk_scale - lse2[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION).to(ACC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION).to(ACC)
        ds_t = p_t * (dp_t - row_delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION).to(ACC)

    dk = dk * sm_scale
    is_patch = k_ok & (offs_n >= HAS_CLS_KEY)
    grad_ptrs = (dqkv + b.to(tl.int64) * (num_patches + base) * 3 * hd + kv_rows[:, None] * (3 * hd)
                 + (hd + h * HEAD_DIM + offs_d)[None, :])
    tile_ok = is_patch[:, None] & d_ok[None, :]
    tl.store(grad_ptrs, dk.to(dqkv.dtype.element_ty), mask=tile_ok)
    tl.store(grad_ptrs + hd, dv.to(dqkv.dtype.element_ty), mask=tile_ok)
    if HAS_CLS_KEY:
        if pid_n == 0:
            is_cls = (offs_n == 0)[:, None]
            cls_ptrs = cls_grad + bg.to(tl.int64) * 3 * hd + hd + h * HEAD_DIM + offs_d
            tl.store(cls_ptrs, tl.sum(tl.where(is_cls, dk, 0.0), axis=0), mask=d_ok)
            tl.store(cls_ptrs + hd, tl.sum(tl.where(is_cls, dv, 0.0), axis=0), mask=d_ok)


def _meta(qkv: torch.Tensor, groups: Groups) -> dict:
    """Compile-time arguments shared by the kernels."""
    hd = groups.num_heads * groups.head_dim
    assert qkv.shape == (groups.batch, groups.base + groups.num_patches, 3 * hd) and qkv.stride(-1) == 1
    return _constexprs(groups, qkv.dtype, qkv.device)


def _constexprs(groups: Groups, dtype: torch.dtype, device: torch.device) -> dict:
    tgt = target.current(device)
    return dict(
        HEAD_DIM=groups.head_dim,
        BLOCK_D=_block_d(groups),
        HAS_CLS_KEY=int(groups.cls_key),
        HAS_CLS_QUERY=int(groups.cls_query),
        ACC=tl.float64 if dtype == torch.float64 else tl.float32,
        DOT_PRECISION=target.dot_precision(dtype, tgt),
        TARGET=tgt.key,
    )


def _group_args(groups: Groups, scale: float) -> tuple:
    return (groups.batch, groups.num_heads, groups.num_groups, groups.seq_len, groups.group_stride, groups.pos_stride,
            groups.base, scale)


def grid(groups: Groups, tiles: int) -> tuple[int, int, int]:
    """The launch grid of ``tiles`` programs per (clip, group, head) (``_program_ids``)."""
    return batch_grid(tiles * groups.num_groups * groups.num_heads, groups.batch,
                      f"{groups.num_groups} groups of {groups.seq_len} tokens and {groups.num_heads} heads")


def spatial_fwd(qkv: torch.Tensor, groups: Groups, scale: float):
    """Returns (out (B, N·T, H·Dh), cls_out (B, G, H·Dh) or None, lse (B, N·T, H),
    cls_lse (B, G, H) or None); lse is the natural log-sum-exp of the scaled scores,
    float32 (float64 for float64 qkv)."""
    b, g, h, hd = groups.batch, groups.num_groups, groups.num_heads, groups.num_heads * groups.head_dim
    stat_dtype = stats_dtype(qkv.dtype)
    out = torch.empty(b, groups.num_patches, hd, dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty(b, groups.num_patches, h, dtype=stat_dtype, device=qkv.device)
    cls_out = cls_lse = None
    if groups.cls_query:
        cls_out = torch.empty(b, g, hd, dtype=qkv.dtype, device=qkv.device)
        cls_lse = torch.empty(b, g, h, dtype=stat_dtype, device=qkv.device)
    num_q = groups.seq_len + int(groups.cls_query)

    _spatial_fwd_kernel[lambda meta: grid(groups, triton.cdiv(num_q, meta["BLOCK_M"]))](
        qkv, out, lse, out if cls_out is None else cls_out, lse if cls_lse is None else cls_lse,
        qkv.stride(0), qkv.stride(1), *_group_args(groups, abs(scale)), NEGATE_Q=scale < 0, **_meta(qkv, groups))
    return out, cls_out, lse, cls_lse


def spatial_bwd(dout, dcls_out, qkv, out, cls_out, lse, cls_lse, groups: Groups, scale: float) -> torch.Tensor:
    """dqkv: a new contiguous tensor of qkv's shape and dtype. dcls_out may be None (zero)."""
    b, g, h, hd = groups.batch, groups.num_groups, groups.num_heads, groups.num_heads * groups.head_dim
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    # A zero dcls_out makes the cls query's softmax contribute nothing to any gradient,
    # so the backward drops it instead of computing zeros.
    if dcls_out is None:
        groups = dataclasses.replace(groups, cls_query=False)
    elif dcls_out.stride(-1) != 1:
        dcls_out = dcls_out.contiguous()
    out, lse = out.contiguous(), lse.contiguous()
    meta = _meta(qkv, groups)
    stat_dtype = lse.dtype
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    num_q = groups.seq_len + int(groups.cls_query)
    # Per-group shares of the cls token's gradient, laid out like a qkv row; the parts no
    # kernel writes (no cls key, or no cls query) stay zero.
    cls_grad = torch.zeros(b, g, 3 * hd, dtype=stat_dtype, device=qkv.device) if groups.base else None
    if groups.cls_query:
        cls_out, cls_lse = cls_out.contiguous(), cls_lse.contiguous()
    else:  # placeholders the kernels never touch
        dcls_out, cls_out, cls_lse = dout, out, lse
    strides = (qkv.stride(0), qkv.stride(1), dout.stride(0), dout.stride(1), dcls_out.stride(0), dcls_out.stride(1))

    if whole_group(groups, qkv.dtype, qkv.device):
        _spatial_bwd_group_kernel[grid(groups, 1)](
            qkv, out, dout, lse, cls_out, dcls_out, cls_lse, dqkv, dqkv if cls_grad is None else cls_grad, *strides,
            *_group_args(groups, scale), BLOCK_M=_group_rows_tile(num_q), **meta)
    else:
        _spatial_bwd_pair(qkv, out, dout, lse, cls_out, dcls_out, cls_lse, dqkv, cls_grad, strides, groups, scale,
                          meta)
    if groups.base:
        dqkv[:, 0] = cls_grad.sum(1).to(qkv.dtype)
    return dqkv


def whole_group(groups: Groups, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the backward runs as one kernel per (clip, group, head) rather than the dQ +
    dK/dV pair: every query of the group in one tile, head dims up to SHORT_HEAD_DIM, and a
    config of it that compiles clean and fits on the target (its pool: sm_90 and sm_100 in
    fp16/bf16; with mma.sync its operands stay in registers and spill, float32's three TF32
    products overflow registers and shared memory). The interpreter (CPU tensors) takes it in
    every dtype, so that float32/64 tests check its maths, unless ``compiling_for`` names a
    target: then the choice is that GPU's (what benchmarks/static records)."""
    rows = groups.seq_len + int(groups.cls_query)
    if groups.head_dim > SHORT_HEAD_DIM or rows > GROUP_BWD_MAX_ROWS:
        return False
    tgt = target.current(device)
    dtype = dtype if device.type == "cuda" or target.forced() else torch.bfloat16
    named = dict(BLOCK_D=_block_d(groups), BLOCK_M=_group_rows_tile(rows), TARGET=tgt.key, HEAD_DIM=groups.head_dim,
                 DOT_PRECISION=target.dot_precision(dtype, tgt))
    try:
        kept("group", named, dtype)
    except DoesNotFit:
        return False
    return True


def _block_d(groups: Groups) -> int:
    return max(16, triton.next_power_of_2(groups.head_dim))


def _group_rows_tile(rows: int) -> int:
    """BLOCK_M of the whole-group backward: the group's queries, padded to a power of two."""
    return max(16, triton.next_power_of_2(rows))


def plan(groups: Groups, dtype: torch.dtype, device: torch.device, backward: bool = True) -> list[tuple[str, list]]:
    """The kernels of a call (forward, and backward), each with the configs it tunes over
    (``kept``; DoesNotFit when one keeps none), as a GPU of the target launches them (also for
    a CPU tensor under compiling_for, see whole_group)."""
    named = _constexprs(groups, dtype, device)
    kinds = [("fwd", named)]
    if backward and whole_group(groups, dtype, device):
        kinds.append(("group", {**named, "BLOCK_M": _group_rows_tile(groups.seq_len + int(groups.cls_query))}))
    elif backward:
        kinds += [("dq", named), ("dkdv", named)]
    return [(_NAMES[kind], kept(kind, n, dtype)) for kind, n in kinds]


def _spatial_bwd_pair(qkv, out, dout, lse, cls_out, dcls_out, cls_lse, dqkv, cls_grad, strides, groups, scale, meta):
    """The backward as a dQ kernel (which also writes the per-query statistics) then a dK/dV kernel."""
    b, g, h = groups.batch, groups.num_groups, groups.num_heads
    num_q = groups.seq_len + int(groups.cls_query)
    num_k = groups.seq_len + int(groups.cls_key)
    stats_stride = STATS_LEAD.value + triton.cdiv(groups.seq_len, _STATS_TILE) * _STATS_TILE
    delta, lse2 = torch.zeros(2, b * g * h, stats_stride, dtype=lse.dtype, device=qkv.device)
    cls_grad = delta if cls_grad is None else cls_grad  # a placeholder the kernels never touch
    args = (*_group_args(groups, scale), stats_stride)
    _spatial_bwd_dq_kernel[lambda m: grid(groups, triton.cdiv(num_q, m["BLOCK_M"]))](
        qkv, out, dout, lse, cls_out, dcls_out, cls_lse, dqkv, cls_grad, delta, lse2, *strides, *args, **meta)
    _spatial_bwd_dkdv_kernel[lambda m: grid(groups, triton.cdiv(num_k, m["BLOCK_N"]))](
        qkv, dout, dcls_out, dqkv, cls_grad, delta, lse2, *strides, *args, **meta)
