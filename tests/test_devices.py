"""The device table (``devices``, ``triton.target``): each GPU users have, described by what
torch reports for it (capability, shared memory per block, ROCm), maps to the intended entry
and path: MMA kind, whole-group backward or dQ + dK/dV pair, dot precision, backends."""
from types import SimpleNamespace

import pytest
import torch

from timesformer_kernels import backends, cuda, devices
from timesformer_kernels.layout import spatial_groups
from timesformer_kernels.triton import target
from timesformer_kernels.triton.spatial import whole_group

KB = 1024


def _props(major, minor, smem, name, sms=100, gcn="", warp=32):
    return SimpleNamespace(major=major, minor=minor, shared_memory_per_block_optin=smem,
                           shared_memory_per_multiprocessor=smem + KB, regs_per_multiprocessor=64 * KB,
                           warp_size=warp, name=name, multi_processor_count=sms, gcnArchName=gcn)


# (what torch reports, hip) -> (entry name, MMA, whole-group backward for bf16 TimeSformer-base: where
# its 8-warp configs for 1 + 196 queries compile clean, pools.py)
GPUS = {
    "A100": ((8, 0, 166912, "NVIDIA A100-SXM4-80GB"), False, "sm_80", "mma.sync", False),
    "A10": ((8, 6, 101376, "NVIDIA A10"), False, "sm_86", "mma.sync", False),
    "L4": ((8, 9, 101376, "NVIDIA L4"), False, "sm_89", "mma.sync", False),
    "H100": ((9, 0, 232448, "NVIDIA H100 80GB HBM3"), False, "sm_90", "wgmma", True),
    "B200": ((10, 0, 232448, "NVIDIA B200"), False, "sm_100", "tcgen05", False),  # its 8-warp configs spill
    "RTX 5090": ((12, 0, 101376, "NVIDIA GeForce RTX 5090"), False, "sm_120", "mma.sync", False),
    # ROCm reports an MI300X as capability 9.4: never Hopper
    "MI300X": ((9, 4, 65536, "AMD Instinct MI300X"), True, "gfx942", "mfma", False),
    # not in the table: limits from the device, MMA from the architecture
    "Jetson Orin": ((8, 7, 166912, "Orin"), False, "sm_87", "mma.sync", False),
    "GB300": ((10, 3, 232448, "NVIDIA GB300"), False, "sm_103", "tcgen05", False),
    "MI250X": ((9, 0, 65536, "AMD Instinct MI250X"), True, "gfx90a", "mfma", False),
}


def _entry(gpu):
    (major, minor, smem, name), hip, *_ = GPUS[gpu]
    gcn = {"MI300X": "gfx942:sramecc+:xnack-", "MI250X": "gfx90a:sramecc+:xnack-"}.get(gpu, "")
    return devices.from_properties(_props(major, minor, smem, name, gcn=gcn, warp=64 if hip else 32), hip=hip)


@pytest.mark.parametrize("gpu", GPUS)
def test_each_gpu_maps_to_its_entry_and_path(gpu):
    (_, _, smem, name), hip, entry, mma, group = GPUS[gpu]
    t = _entry(gpu)
    assert (t.name, t.mma, t.vendor, t.smem_per_block, t.device) == (entry, mma, "hip" if hip else "cuda", smem, name)
    assert t.warp_size == (64 if hip else 32)
    groups = spatial_groups(8, 1 + 196 * 8, 8, 12, 64, "space_major")
    with target.compiling_for(t):
        assert target.current(torch.device("cuda")) is t
        assert whole_group(groups, torch.bfloat16, torch.device("cuda")) is group
        assert not whole_group(groups, torch.float32, torch.device("cuda"))  # float32 takes the pair everywhere


def test_table_rows_match_what_the_devices_report():
    """The table's own rows (what the static report compiles for) and the same GPUs read from
    their properties agree on everything but the device's name and SM count."""
    for gpu in ("A100", "A10", "L4", "H100", "B200", "RTX 5090", "MI300X"):
        t = _entry(gpu)
        row = devices.TARGETS[t.name]
        assert (row.vendor, row.mma, row.smem_per_block, row.warp_size) == (t.vendor, t.mma, t.smem_per_block,
                                                                             t.warp_size)


def test_keys_tell_devices_apart():
    """Autotune results are keyed by Target.key: two kinds of GPU never share one."""
    keys = {_entry(gpu).key for gpu in GPUS}
    assert len(keys) == len(GPUS)
    assert _entry("A10").key != devices.TARGETS["sm_86"].key  # the device's name is part of it


def test_compiling_for_takes_names_and_entries():
    with target.compiling_for("sm_120") as t:
        assert target.current(torch.device("cuda")) is devices.TARGETS["sm_120"] is t
        with target.compiling_for(devices.TARGETS["gfx942"]):
            assert target.current(torch.device("cpu")).name == "gfx942"
        assert target.current(torch.device("cpu")).name == "sm_120"
    assert not target.forced() and target.current(torch.device("cpu")) is target.INTERPRETER
    with pytest.raises(ValueError, match="unknown target 'sm_75'"):
        with target.compiling_for("sm_75"):
            pass


@pytest.mark.parametrize("setting, cuda_precision, amd_precision", [
    ("highest", "tf32x3", "ieee"), ("high", "tf32", "tf32"), ("medium", "tf32", "tf32")])
def test_float32_dot_precision_follows_torch(setting, cuda_precision, amd_precision):
    """torch.get_float32_matmul_precision(): "highest" keeps float32 accuracy (three TF32
    products on NVIDIA, float32 MFMA on AMD), "high"/"medium" allow TF32 (XF32 on the MI300);
    16-bit and float64 operands are not affected."""
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(setting)
        for name in ("sm_80", "sm_86", "sm_90", "sm_100", "sm_120"):
            assert target.dot_precision(torch.float32, devices.TARGETS[name]) == cuda_precision
        assert target.dot_precision(torch.float32, devices.TARGETS["gfx942"]) == amd_precision
        assert target.dot_precision(torch.float32, _entry("MI250X")) == "ieee"  # no XF32 before CDNA3
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            assert target.dot_precision(dtype, devices.TARGETS["sm_90"]) == "ieee"
    finally:
        torch.set_float32_matmul_precision(old)


def test_cuda_extension_is_never_offered_on_rocm(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2")
    groups = spatial_groups(1, 1 + 196 * 8, 8, 12, 64, "space_major")
    reasons = cuda.why_not(torch.empty(1, 1, 1), groups)
    assert any("ROCm" in r for r in reasons), reasons
    assert "cuda" in backends.BACKEND_NAMES
