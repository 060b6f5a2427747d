"""Never a crash where a fallback exists, checked on the CPU for every GPU of the device table.

- every (kernel, dtype, head dim, kind of group, target) keeps at least one autotune config
  that compiles clean and fits the target's shared memory, or ``why_not("triton")`` names it
  (so ``auto`` takes the next backend and ``backend="triton"`` raises before any launch);
- a launch that runs out of resources anyway (Triton's OutOfResources) goes to the next
  backend under ``auto`` and raises a ValueError naming the call under ``backend="triton"``;
  in the backward, the torch backend's gradient, with a warning;
- the dot precision each float32 matmul setting selects reaches the kernels' launches;
- every autotuned kernel is keyed on the target (a config tuned on one GPU is never reused on
  another), and ``tk.info()`` says how many configs each kernel tunes over.
"""
import dataclasses

import pytest
import torch
from triton.runtime.errors import OutOfResources

import timesformer_kernels as tk
from timesformer_kernels import backends, devices
from timesformer_kernels import triton as kernels
from timesformer_kernels.layout import spatial_groups, temporal_groups
from timesformer_kernels.triton import spatial, target, temporal

DTYPES = {"bf16": (torch.bfloat16, "highest"), "fp16": (torch.float16, "highest"),
          "fp32": (torch.float32, "highest"), "tf32": (torch.float32, "high")}
HEAD_DIMS = (40, 64, 80, 128, 160, 256)
# Kinds of group: (op, frames, patches, token order, cls key): temporal groups of 8, 16, 25,
# 65-128 and 256 frames, spatial groups of 197 (one tile) and 785 queries.
GROUPS = {
    "temporal T=8": ("temporal", 8, 196, "space_major", False),
    "temporal T=16 cls key": ("temporal", 16, 64, "time_major", True),
    "temporal T=25": ("temporal", 25, 64, "time_major", False),
    "temporal T=96": ("temporal", 96, 16, "space_major", False),
    "temporal T=256 cls key": ("temporal", 256, 4, "time_major", True),
    "spatial N=196": ("spatial", 8, 196, "space_major", True),
    "spatial N=784": ("spatial", 4, 784, "space_major", True),
}


def _calls(dtype, head_dims=HEAD_DIMS, heads=2):
    """(kind, head dim, qkv that will need a gradient, groups) of every kind of group and head dim."""
    for kind, (op, t, n, order, cls) in GROUPS.items():
        for head_dim in head_dims:
            qkv = torch.empty(1, int(cls) + n * t, 3 * heads * head_dim, dtype=dtype, requires_grad=True)
            if op == "temporal":
                yield kind, head_dim, qkv, temporal_groups(1, qkv.shape[1], t, heads, head_dim, order, cls)
            else:
                yield kind, head_dim, qkv, spatial_groups(1, qkv.shape[1], t, heads, head_dim, order)


@pytest.fixture
def precision():
    saved = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(saved)


@pytest.mark.parametrize("name", devices.TARGETS)
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_every_call_keeps_a_fitting_config_or_is_routed(name, dtype_name, precision):
    """For every head dim and kind of group: the kernels of the call (forward and backward)
    each keep configs that are known to compile clean for the target and fit its shared
    memory, or triton's why_not says which kernel does not, naming the device, dtype and
    head dim, and auto would take the next backend."""
    dtype, setting = DTYPES[dtype_name]
    precision(setting)
    with target.compiling_for(name):
        for kind, head_dim, qkv, groups in _calls(dtype):
            reasons = kernels.why_not(qkv, groups)
            if reasons and devices.TARGETS[name].vendor == "hip":
                assert reasons == [kernels.ROCM]
            elif reasons:
                assert name in reasons[0] and str(head_dim) in reasons[0], reasons
                assert str(dtype).removeprefix("torch.") in reasons[0], reasons
                assert backends.why_not("triton", qkv, groups) == reasons
            else:
                for kernel, configs in kernels.plan(groups, qkv.dtype, qkv.device):
                    assert configs, (kind, head_dim, kernel)


@pytest.mark.parametrize("name", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype_name", ["bf16", "fp16", "tf32"])
def test_fast_path_runs_every_16_bit_and_tf32_call_on_a100_and_h100(name, dtype_name, precision):
    """Training (forward and backward) in fp16, bf16 and float32 at "high" runs the Triton
    kernels for every head dim and kind of group on the A100 and the H100."""
    dtype, setting = DTYPES[dtype_name]
    precision(setting)
    with target.compiling_for(name):
        for kind, head_dim, qkv, groups in _calls(dtype):
            assert kernels.why_not(qkv, groups) == [], (kind, head_dim)


@pytest.mark.parametrize("name", ["sm_80", "sm_90"])
def test_fast_path_runs_float32_at_timesformer_head_dims(name):
    """float32 at "highest" precision (three TF32 products) keeps clean configs up to head dim
    64 (TimeSformer's 64, AnimateDiff's 40); wider heads route to another backend."""
    with target.compiling_for(name):
        for kind, head_dim, qkv, groups in _calls(torch.float32, (40, 64)):
            assert kernels.why_not(qkv, groups) == [], (kind, head_dim)


def test_explicit_triton_raises_naming_what_does_not_fit(precision):
    """float32 at head dim 128, "highest": every three-TF32 dQ config spills, and under Triton
    3.6 every forward one too (static report), so the call is refused before anything runs,
    with what and where; at "high" (one TF32 product) it runs."""
    precision("highest")
    qkv = torch.randn(1, 1 + 4 * 2, 3 * 128, dtype=torch.float32, requires_grad=True)
    with target.compiling_for("sm_86"):
        with pytest.raises(ValueError, match=r"backend='triton' cannot run this call: .*float32 head_dim 128 on sm_86"):
            tk.spatial_attention(qkv, 2, 1, backend="triton")
        assert tk.spatial_attention(qkv, 2, 1, backend="auto")[0].shape == (1, 8, 128)  # CPU: torch
        groups = spatial_groups(1, 9, 2, 1, 128, "space_major")
        with torch.no_grad():  # inference needs only the forward kernel: refused too
            assert "_spatial_fwd_kernel" in backends.why_not("triton", qkv, groups)[0]
        precision("high")
        assert backends.why_not("triton", qkv, groups) == []


def test_a_gpu_with_too_little_shared_memory_is_refused():
    """An sm_86 whose shared memory per block is 16 KB (what a device could report): no config
    fits, and why_not says how much the smallest one needs and how much the device has."""
    small = dataclasses.replace(devices.TARGETS["sm_86"], smem_per_block=16 * 1024, device="a small GPU")
    qkv = torch.empty(1, 1 + 196 * 8, 3 * 12 * 64, dtype=torch.bfloat16)
    with target.compiling_for(small):
        (reason,) = kernels.why_not(qkv, spatial_groups(1, qkv.shape[1], 8, 12, 64, "space_major"))
    assert "a small GPU, 16,384 B of shared memory per block" in reason, reason
    assert "its smallest config needs" in reason and "bfloat16 head_dim 64" in reason, reason


@pytest.fixture
def gpu_like_auto(monkeypatch):
    """``auto`` as on a CUDA device (triton, cuda, torch), for CPU tensors under the interpreter."""
    def choose(backend, qkv, groups):
        if backend != "auto":
            return real(backend, qkv, groups)
        return next(n for n in ("triton", "torch") if not backends.why_not(n, qkv, groups))

    real = backends.choose
    monkeypatch.setattr(backends, "choose", choose)
    monkeypatch.setattr(backends, "_failed", {})


def _out_of_resources(*args, **kwargs):
    raise OutOfResources(301056, 232448, "shared memory")


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_out_of_resources_at_launch(monkeypatch, gpu_like_auto, where):
    """The forward's launch failing: auto reruns the call on the next backend and notes the
    failure (why_not names it from then on); backend="triton" raises a ValueError naming the
    dtype, head dim and device. The backward's: the torch backend's gradient, with a warning."""
    monkeypatch.setattr(temporal, "temporal_fwd" if where == "forward" else "temporal_bwd", _out_of_resources)
    qkv = torch.randn(2, 3 * 4, 3 * 2 * 16, dtype=torch.float64, requires_grad=True)
    groups = temporal_groups(2, 12, 3, 2, 16, "space_major", False)
    ref = tk.temporal_attention(qkv, 3, 2, backend="torch")
    (dref,) = torch.autograd.grad(ref.sum(), qkv)
    if where == "forward":
        with pytest.raises(ValueError, match="float64 head_dim 16 does not fit sm_90.*out of resource: shared memory"):
            tk.temporal_attention(qkv, 3, 2, backend="triton")
        out = tk.temporal_attention(qkv, 3, 2, backend="auto")
        assert any("a launch on this device failed" in r for r in backends.why_not("triton", qkv, groups))
        (dqkv,) = torch.autograd.grad(out.sum(), qkv)
    else:
        out = tk.temporal_attention(qkv, 3, 2, backend="triton")
        with pytest.warns(UserWarning, match="computed by the torch backend instead"):
            (dqkv,) = torch.autograd.grad(out.sum(), qkv)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dqkv, dref)


@pytest.mark.parametrize("setting, expected", [("highest", "tf32x3"), ("high", "tf32"), ("medium", "tf32")])
def test_launches_carry_the_selected_dot_precision(monkeypatch, precision, setting, expected):
    """What each float32 matmul setting makes the launches pass as DOT_PRECISION (the
    ``input_precision`` of every tl.dot), recorded from the wrappers without running a kernel."""
    seen = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(kwargs["DOT_PRECISION"])

    for module in (temporal, spatial):
        for name in [n for n in vars(module) if n.endswith("_kernel")]:
            monkeypatch.setattr(module, name, Recorder())
    precision(setting)
    for dtype, want in ((torch.float32, expected), (torch.bfloat16, "ieee")):
        seen.clear()
        qkv = torch.empty(1, 1 + 4 * 2, 3 * 64, dtype=dtype)
        with target.compiling_for("sm_80"):
            temporal.temporal_fwd(qkv[:, 1:], temporal_groups(1, 8, 2, 1, 64, "space_major", False), 0.1)
            spatial.spatial_fwd(qkv, spatial_groups(1, 9, 2, 1, 64, "space_major"), 0.1)
        assert seen == [want, want]


def test_config_choice_is_keyed_on_the_device():
    """Every autotuned kernel's key has the TARGET constexpr, which is Target.key (different
    for every kind of GPU), so the autotuner's cache never hands one GPU's choice to another."""
    for module in (temporal, spatial):
        assert "TARGET" in module._TUNE_KEY
    qkv = torch.empty(1, 9, 192, dtype=torch.bfloat16)
    keys = set()
    for name in devices.TARGETS:
        with target.compiling_for(name):
            keys.add(spatial._meta(qkv, spatial_groups(1, 9, 2, 1, 64, "space_major"))["TARGET"])
    assert len(keys) == len(devices.TARGETS)


def test_info_lists_configs_per_kernel():
    text = tk.info()
    assert "triton configs per kernel on cpu" in text
    for kernel in ("_temporal_fwd_kernel", "_temporal_bwd_kernel", "_spatial_fwd_kernel"):
        assert kernel in text
