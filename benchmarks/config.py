"""Benchmark shapes and the work model: FLOPs and the fewest bytes each op must move.

Notation: B clips, T frames, N patches per frame, P = N·T patch tokens per clip, H heads of
Dh channels, D = H·Dh, s bytes per element. qkv is (B, 1 + P, 3·D), cls token at row 0,
patches space-major (row 1 + n·T + t), exactly what a Hugging Face / official TimeSformer
block's qkv Linear produces.

FLOPs (the flash-attention convention): a group of Lq queries over Lk keys costs
4·H·Lq·Lk·Dh forward (2·Lq·Lk·Dh for Q·Kᵀ and 2·Lq·Lk·Dh for P·V per head; the softmax
is not counted), summed over the groups:

    temporal  B·N groups, Lq = Lk = T        fwd = 4·B·N·H·T²·Dh
    spatial   B·T groups, Lq = Lk = 1 + N    fwd = 4·B·T·H·(1 + N)²·Dh
              (each frame group is [cls, its N patches]: the cls query and key join every group)

    bwd = 2.5·fwd (five matrix products instead of two), fwd+bwd = 3.5·fwd.

Bytes (each input read once, each output written once; the fp32 log-sum-exp that a fused
forward saves for its backward is a few percent and not counted):

    temporal fwd  read q, k, v of the P patch rows, write out:      s·B·D·(3·P + P)
    spatial  fwd  read q, k, v of all 1 + P rows, write out and
                  cls_out (one cls output per frame group, B·T·D):   s·B·D·(3·(1 + P) + P + T)
    bwd           temporal  read qkv and dout, write dqkv:  s·B·D·(3·P + P + 3·P) = 7·s·B·D·P
                            (all keys of a group are in one tile, so rowsum(dO∘O) comes from
                            P and dP as ΣP∘dP / ΣP: ``out`` need not be read)
                  spatial   read qkv, out and dout (with the cls rows), write dqkv:
                            s·B·D·(3·(1 + P) + 2·(P + T) + 3·(1 + P))
    fwd+bwd       fwd + bwd.

These are the floors the roofline percentages use: time_floor = bytes / copy bandwidth
(memory roofline) and flops / matmul peak (compute roofline), both measured on the device in
the same run (``timing.measure_rooflines``).
"""
from __future__ import annotations

from dataclasses import dataclass

OPS = ("temporal", "spatial")
KERNEL_NAMES = {"temporal": "temporal_attention", "spatial": "spatial_attention"}
MODES = ("fwd", "bwd", "fwd+bwd")
MODE_ALIASES = {"forward": "fwd", "backward": "bwd", "full": "fwd+bwd", "fwd_bwd": "fwd+bwd"}
BWD_FLOP_FACTOR = 2.5

DTYPE_ALIASES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32", "fp64": "float64", "float64": "float64",
}


@dataclass(frozen=True)
class Shape:
    """One benchmark configuration of a TimeSformer attention layer."""

    name: str  # "base", "hr", "l", "tiny"
    batch: int  # B
    frames: int  # T
    patches: int  # N, per frame
    dim: int  # D = H·Dh
    heads: int  # H

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def tokens(self) -> int:
        """Rows of qkv: the cls token plus N·T patch tokens."""
        return 1 + self.patches * self.frames

    @property
    def label(self) -> str:
        return f"{self.name} B={self.batch}"

    def config(self) -> dict:
        """The shape part of a CSV row's extra_benchmark_config."""
        return {"shape": self.name, "B": self.batch, "T": self.frames, "N": self.patches, "D": self.dim,
                "H": self.heads, "Dh": self.head_dim}


# name -> (default batches, T, N, D, H). base: TimeSformer 8×224² (16 px patches: N = 14² = 196);
# hr: TimeSformer-HR 16×448² (N = 28² = 784); l: TimeSformer-L 96×224²; tiny: the CPU smoke size.
SHAPE_FAMILIES = {
    "base": ((8, 1, 32), 8, 196, 768, 12),
    "hr": ((4,), 16, 784, 768, 12),
    "l": ((2,), 96, 196, 768, 12),
    "tiny": ((1, 2), 2, 4, 32, 2),
}
# Order matters: the first (dtype, shape) is measured first (TimeSformer-base at B=8 is the
# shape of the project's targets), so a run cut short by its time budget still has it.
DEFAULT_SHAPES = "base,hr,l"
SMOKE_SHAPES = "tiny"


def parse_shapes(spec: str) -> list[Shape]:
    """'base,hr' or 'base:8,32;hr' or 'base:1:8,l' -> shapes. A family name alone takes its
    default batches; ':b1:b2' or ':b1,b2' right after a family picks batches."""
    shapes: list[Shape] = []
    family = None
    for item in spec.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        if item.isdigit():  # a further batch of the previous family: "base:8,32"
            if family is None:
                raise ValueError(f"--shapes: batch {item} before any shape name in {spec!r}")
            batches = [int(item)]
        else:
            name, *rest = item.split(":")
            if name not in SHAPE_FAMILIES:
                raise ValueError(f"--shapes: unknown shape {name!r} (known: {', '.join(SHAPE_FAMILIES)})")
            family = name
            batches = [int(b) for b in rest if b] or list(SHAPE_FAMILIES[name][0])
        _, t, n, d, h = SHAPE_FAMILIES[family]
        for b in batches:
            if b < 1:
                raise ValueError(f"--shapes: batch must be >= 1, got {b}")
            shape = Shape(family, b, t, n, d, h)
            if shape not in shapes:
                shapes.append(shape)
    if not shapes:
        raise ValueError(f"--shapes: no shape in {spec!r}")
    return shapes


def parse_modes(spec: str) -> list[str]:
    modes = []
    for m in spec.split(","):
        m = MODE_ALIASES.get(m.strip(), m.strip())
        if m not in MODES:
            raise ValueError(f"--modes: unknown mode {m!r} (known: {', '.join(MODES)})")
        if m not in modes:
            modes.append(m)
    return modes


def parse_dtypes(spec: str) -> list[str]:
    names = []
    for d in spec.split(","):
        key = d.strip().lower()
        if key not in DTYPE_ALIASES:
            raise ValueError(f"--dtype: unknown dtype {d!r} (bf16, fp16, fp32, fp64)")
        if DTYPE_ALIASES[key] not in names:
            names.append(DTYPE_ALIASES[key])
    return names


def parse_ops(spec: str) -> list[str]:
    ops = []
    for o in spec.split(","):
        o = o.strip().replace("_attention", "")
        if o not in OPS:
            raise ValueError(f"--op: unknown op {o!r} (temporal, spatial)")
        if o not in ops:
            ops.append(o)
    return ops


def forward_flops(op: str, shape: Shape) -> float:
    """Forward FLOPs of one op call (module docstring)."""
    b, t, n, h, dh = shape.batch, shape.frames, shape.patches, shape.heads, shape.head_dim
    if op == "temporal":
        return 4.0 * b * n * h * t * t * dh
    return 4.0 * b * t * h * (1 + n) ** 2 * dh


def flops(op: str, shape: Shape, mode: str) -> float:
    fwd = forward_flops(op, shape)
    return {"fwd": fwd, "bwd": BWD_FLOP_FACTOR * fwd, "fwd+bwd": (1 + BWD_FLOP_FACTOR) * fwd}[mode]


def bytes_moved(op: str, shape: Shape, mode: str, itemsize: int) -> float:
    """Fewest bytes one call must move through device memory (module docstring)."""
    b, t, d = shape.batch, shape.frames, shape.dim
    p = shape.patches * t
    if op == "temporal":
        fwd, bwd = 4 * p, 7 * p
    else:
        fwd = 3 * (1 + p) + p + t
        bwd = 6 * (1 + p) + 2 * (p + t)
    units = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
    return float(units) * b * d * itemsize
