"""The GPUs the kernels are chosen for: one table of the facts that config and kernel choice
need, and the entry of an actual device, read from the device at run time.

Every decision that depends on the GPU (which autotune configs fit, which backward kernel,
which dot precision, whether a backend may run at all) reads a ``Target``; none guesses the
generation from the compute capability's major alone (sm_120 and sm_86 have the shared memory
of neither sm_90 nor sm_80, and ROCm reports an MI300X as capability 9.4).

    target    GPUs                    shared memory / block   MMA        warp  max warps / SM
    sm_80     A100                    163 KB (166,912 B)      mma.sync   32    64
    sm_86     A10, A40, RTX 3090      99 KB (101,376 B)       mma.sync   32    48
    sm_89     L4, L40S, RTX 4090      99 KB                   mma.sync   32    48
    sm_90     H100, H200              227 KB (232,448 B)      wgmma      32    64
    sm_100    B200                    227 KB                  tcgen05    32    64
    sm_120    RTX 5090                99 KB                   mma.sync   32    48
    gfx942    MI300X (ROCm)           64 KB LDS (65,536 B)    MFMA       64    32 waves / CU

``of(device)`` builds the entry of a real device from ``torch.cuda.get_device_properties``
(its own shared-memory limit, SM count and name), named like the table's row.
"""
from __future__ import annotations

import dataclasses

import torch

KB = 1024


@dataclasses.dataclass(frozen=True)
class Target:
    """What config and kernel choice need to know about one GPU (or GPU architecture)."""

    name: str  # "sm_86", "gfx942": the compile target
    vendor: str  # "cuda" or "hip" (ROCm)
    smem_per_block: int  # bytes of shared memory (LDS) one block may opt in to
    mma: str  # matrix instructions Triton emits: "mma.sync", "wgmma", "tcgen05", "mfma", "wmma" or "none"
    warp_size: int = 32  # threads per warp (wavefront)
    smem_per_sm: int = 228 * KB
    regs_per_sm: int = 64 * KB  # 32-bit registers per SM (VGPRs x lanes per CU on AMD)
    regs_per_thread: int = 255  # the most one thread may use (arch VGPRs + AGPRs on AMD)
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    gpus: str = ""  # for people: which products this is
    device: str = ""  # the device's name when read from one, else ""
    sms: int = 0  # multiprocessors (CUs) when read from a device, else 0

    @property
    def arch(self) -> int | str:
        """The architecture as Triton's ``GPUTarget`` takes it: 86, or "gfx942"."""
        return int(self.name[3:]) if self.vendor == "cuda" else self.name

    @property
    def mma_reads_smem(self) -> bool:
        """wgmma and tcgen05 take their operands from shared memory, so a tile's MMA operands
        do not occupy registers as they do with mma.sync: larger tiles fit without spilling."""
        return self.mma in ("wgmma", "tcgen05")

    @property
    def label(self) -> str:
        """For messages: "sm_86 (NVIDIA A10, 101,376 B of shared memory per block)"."""
        return f"{self.name} ({self.device or self.gpus}, {self.smem_per_block:,} B of shared memory per block)"

    @property
    def key(self) -> str:
        """Identity of the device for caches of tuned configs: configs tuned on one kind of
        GPU are never reused on another (a mixed node, or a compile for another target)."""
        return "|".join(str(v) for v in (self.name, self.smem_per_block, self.device, self.sms) if v)


_SM80 = dict(vendor="cuda", mma="mma.sync", smem_per_block=163 * KB, smem_per_sm=164 * KB)
_SM86 = dict(vendor="cuda", mma="mma.sync", smem_per_block=99 * KB, smem_per_sm=100 * KB, max_warps_per_sm=48,
             max_blocks_per_sm=16)
_SM90 = dict(vendor="cuda", smem_per_block=227 * KB, smem_per_sm=228 * KB)
TARGETS = {t.name: t for t in (
    Target("sm_80", **_SM80, gpus="A100"),
    Target("sm_86", **_SM86, gpus="A10, A40, RTX 3090"),
    Target("sm_89", **{**_SM86, "max_blocks_per_sm": 24}, gpus="L4, L40S, RTX 4090"),
    Target("sm_90", **_SM90, mma="wgmma", gpus="H100, H200"),
    Target("sm_100", **_SM90, mma="tcgen05", gpus="B200"),
    Target("sm_120", **{**_SM86, "max_blocks_per_sm": 32}, gpus="RTX 5090"),
    # CDNA3: 64 KB of LDS per workgroup, 4 SIMDs of 512 VGPRs (arch + accumulation) per lane and
    # at most 8 waves each; Triton's num_warps counts wavefronts of 64.
    Target("gfx942", "hip", 64 * KB, "mfma", warp_size=64, smem_per_sm=64 * KB, regs_per_sm=4 * 512 * 64,
           regs_per_thread=512, max_warps_per_sm=32, max_blocks_per_sm=32, gpus="MI300X, MI300A, MI325X"),
)}


def _cuda_mma(major: int, minor: int) -> str:
    """The MMA Triton emits for an NVIDIA architecture: wgmma only on sm_90 (the 'a' features),
    tcgen05 on the datacenter Blackwells (sm_100/103, sm_110), mma.sync from Ampere on, which
    includes the consumer Blackwell sm_120."""
    if (major, minor) == (9, 0):
        return "wgmma"
    if major in (10, 11):
        return "tcgen05"
    return "mma.sync" if major >= 8 else "none"


def from_properties(props, hip: bool) -> Target:
    """The table's entry for a device's architecture with the device's own limits (shared
    memory per block and per SM, registers, SM count, name); an architecture the table does not
    know gets those limits and the MMA its architecture implies."""
    if hip:
        name = props.gcnArchName.split(":")[0]
        known = TARGETS.get(name) or Target(name, "hip", 0, "mfma" if name.startswith("gfx9") else "wmma",
                                            warp_size=props.warp_size)
    else:
        name = f"sm_{props.major}{props.minor}"
        known = TARGETS.get(name) or Target(name, "cuda", 0, _cuda_mma(props.major, props.minor))
    return dataclasses.replace(
        known, smem_per_block=props.shared_memory_per_block_optin, smem_per_sm=props.shared_memory_per_multiprocessor,
        regs_per_sm=props.regs_per_multiprocessor, warp_size=props.warp_size, device=props.name,
        sms=props.multi_processor_count)


_read: dict[int, Target] = {}


def of(device: torch.device) -> Target:
    """The entry of a CUDA (or ROCm) device, read from its properties once per process."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _read:
        _read[index] = from_properties(torch.cuda.get_device_properties(index), hip=torch.version.hip is not None)
    return _read[index]


@torch.compiler.assume_constant_result  # torch.compile cannot trace this torch function returning a str
def float32_matmul_precision() -> str:
    """``torch.get_float32_matmul_precision()``: "highest", "high" or "medium"."""
    return torch.get_float32_matmul_precision()
