"""What this install can run: ``tk.info()`` or ``python -m timesformer_kernels``."""
from __future__ import annotations

import platform

import torch

from . import backends
from ._version import __version__
from .layout import spatial_groups


def info() -> str:
    """Versions, built extension, devices and the backend ``auto`` picks for a base-size call."""
    from . import cuda

    lines = [f"timesformer_kernels {__version__}", f"python {platform.python_version()}, torch {torch.__version__}"]
    if backends.triton_available():
        import triton

        lines.append(f"triton {triton.__version__}" + (" (TRITON_INTERPRET=1)" if backends.interpreting() else ""))
    else:
        lines.append("triton: not installed")
    lines.append("cuda extension: " + ("built" if cuda.available() else f"not built ({cuda.build_hint})"))
    devices = ["cpu"] + [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    lines.append("devices: " + ", ".join(devices))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # why_not looks at the device, dtype and group geometry: a TimeSformer-base spatial call
    # (T=8, N=196, 12 heads of 64) with a one-element stand-in for qkv.
    qkv = torch.empty((1, 1, 1), dtype=dtype, device=device)
    groups = spatial_groups(1, 1 + 196 * 8, 8, 12, 64, "space_major")
    for name in ("torch", "triton", "cuda"):
        reasons = backends.why_not(name, qkv, groups)
        lines.append(f"backend {name}: " + ("usable" if not reasons else "unusable: " + "; ".join(reasons)))
    lines.append(f"auto picks on {device} {dtype}: {backends.choose('auto', qkv, groups)}")
    return "\n".join(lines)
