"""Small runs of every CUDA kernel of timesformer_kernels._C, forward and backward, for
compute-sanitizer (not a pytest file):

    compute-sanitizer --tool memcheck  python tests/sanitize_cuda.py
    compute-sanitizer --tool racecheck python tests/sanitize_cuda.py
    compute-sanitizer --tool synccheck python tests/sanitize_cuda.py

Cases cover: temporal_fwd_kernel / temporal_bwd_kernel (short groups, several heads per block,
a head chunk that does not divide H, cls key), spatial_fwd/bwd_dkdv/bwd_dq kernels (fp16 and
bf16, Dh 64 and 128, partial query and key tiles, cls query and key), the fp32 path of long
groups (temporal_fwd_kernel streaming keys + spatial_bwd_*_fp32 kernels), bwd_rowdot_kernel,
both token orders, and a strided qkv. Exits non-zero if an output is not finite.
"""
from __future__ import annotations

import sys

import torch

from timesformer_kernels import cuda as tk_cuda
from timesformer_kernels.layout import spatial_groups, temporal_groups

# (op, B, N, T, H, Dh, dtype, token_order, with_cls, strided)
CASES = [
    ("temporal", 2, 5, 8, 3, 64, torch.bfloat16, "space_major", True, False),   # short, cls key
    ("temporal", 1, 4, 8, 5, 128, torch.float16, "time_major", False, True),    # short, strided
    ("temporal", 1, 3, 6, 2, 64, torch.float32, "space_major", True, False),    # short, fp32
    ("temporal", 1, 3, 40, 2, 64, torch.float16, "time_major", True, False),    # long: tensor cores
    ("temporal", 1, 2, 36, 2, 128, torch.float32, "space_major", False, False), # long: fp32 path
    ("spatial", 1, 70, 2, 2, 64, torch.float16, "space_major", True, False),    # 71 rows: 2 tiles
    ("spatial", 1, 70, 2, 2, 128, torch.bfloat16, "time_major", True, True),    # Dh 128 tiles, strided
    ("spatial", 1, 20, 2, 2, 64, torch.float32, "time_major", True, False),     # fp32 spatial
]


def run(op, b, n, t, h, dh, dtype, order, with_cls, strided) -> bool:
    length = n * t + (1 if (with_cls or op == "spatial") else 0)
    channels = 3 * h * dh
    if strided:
        qkv = torch.randn(b, length + 2, channels + 16, device="cuda").to(dtype)[:, 1:1 + length, 8:8 + channels]
    else:
        qkv = torch.randn(b, length, channels, device="cuda").to(dtype)
    if op == "temporal":
        groups = temporal_groups(b, length, t, h, dh, order, with_cls)
    else:
        groups = spatial_groups(b, length, t, h, dh, order)
    scale = dh ** -0.5
    out, cls_out, lse, cls_lse = tk_cuda.attention_fwd(qkv, groups, scale)
    dout = torch.randn_like(out)
    dcls = torch.randn_like(cls_out) if cls_out is not None else None
    dqkv = tk_cuda.attention_bwd(dout, dcls, qkv, out, cls_out, lse, cls_lse, groups, scale)
    torch.cuda.synchronize()
    tensors = [out, lse, dqkv] + ([cls_out, cls_lse] if cls_out is not None else [])
    ok = all(bool(torch.isfinite(x).all()) for x in tensors)
    print(f"{'ok  ' if ok else 'FAIL'} {op:8s} B={b} N={n} T={t} H={h} Dh={dh} {str(dtype):15s} {order:11s} "
          f"cls={with_cls} strided={strided}", flush=True)
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    if not tk_cuda.available():
        print(f"extension not built ({tk_cuda.load_error()}); {tk_cuda.build_hint}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    results = [run(*case) for case in CASES]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
