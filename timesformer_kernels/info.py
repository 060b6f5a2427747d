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
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # why_not looks at the device, dtype and group geometry: a TimeSformer-base spatial call
    # (B=1, T=8, N=196, 12 heads of 64)
    qkv = torch.empty((1, 1 + 196 * 8, 3 * 12 * 64), dtype=dtype, device=device)
    groups = spatial_groups(1, qkv.shape[1], 8, 12, 64, "space_major")
    for name in ("torch", "triton", "cuda"):
        reasons = backends.why_not(name, qkv, groups)
        lines.append(f"backend {name}: " + ("usable" if not reasons else "unusable: " + "; ".join(reasons)))
    lines.append(f"auto picks on {device.type} {dtype}: {backends.choose('auto', qkv, groups)}")
    if backends.triton_available():
        lines.append(_triton_configs(qkv, groups))
    return "\n".join(lines)


def _triton_configs(qkv: torch.Tensor, groups) -> str:
    """How many autotune configs each Triton kernel of a TimeSformer-base layer (temporal and
    spatial attention, forward and backward) tunes over on this device."""
    from . import triton as kernels
    from .layout import temporal_groups
    from .triton import target

    if qkv.device.type != "cuda":
        names = [*kernels.temporal._NAMES.values(), *kernels.spatial._NAMES.values()]
        how = "one config each under the interpreter" if backends.interpreting() else "no GPU: none run"
        return f"triton configs per kernel on cpu ({how}): " + ", ".join(names)
    calls = [(qkv[:, 1:], temporal_groups(1, qkv.shape[1] - 1, 8, 12, 64, "space_major", False)), (qkv, groups)]
    entry = target.current(qkv.device)
    counts = []
    for x, g in calls:
        try:
            counts += [f"{name} {len(configs)}" for name, configs in kernels.plan(g, x.dtype, x.device)]
        except backends.DoesNotFit as e:
            counts.append(str(e))
    where = f"{entry.label}, {entry.mma}, {qkv.dtype} TimeSformer-base"
    return f"triton configs per kernel on {where}: " + ", ".join(counts)
