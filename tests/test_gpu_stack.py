"""GPU-only checks of the rest of the stack: CUDA graph capture and replay of a fused
forward+backward, and the fused backward's peak memory vs the unfused path's."""
import pytest
import torch

import timesformer_kernels as tk

pytestmark = pytest.mark.gpu


def _block(backend):
    torch.manual_seed(0)
    return tk.DividedSpaceTimeBlock(256, 4, 4, qkv_bias=True, backend=backend).cuda()


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_cuda_graph_capture_and_replay(backend):
    blk = _block(backend)
    x = torch.randn(2, 1 + 49 * 4, 256, device="cuda", requires_grad=True)
    params = [x, *blk.parameters()]

    def step():
        y = blk(x)
        return torch.autograd.grad(y.square().mean(), params)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (autotuning, allocations) outside the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_grads = step()
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    for g, e in zip(static_grads, step()):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def _peak_fwd_bwd(backend):
    """Peak extra memory of forward+backward of both ops at TimeSformer-base size, bf16."""
    b, t, n, h, dh = 8, 8, 196, 12, 64
    qkv = torch.randn(b, 1 + n * t, 3 * h * dh, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, cls_out = tk.spatial_attention(qkv, t, h, backend=backend)
    out_t = tk.temporal_attention(qkv[:, 1:], t, h, backend=backend)
    (out.float().sum() + cls_out.float().sum() + out_t.float().sum()).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_fused_backward_peak_memory_not_above_unfused():
    fused = _peak_fwd_bwd("triton")
    unfused = _peak_fwd_bwd("torch")  # rearranges + SDPA + rearranges back
    print(f"peak extra memory, base size bf16 fwd+bwd: fused {fused / 2**20:.1f} MiB, "
          f"unfused {unfused / 2**20:.1f} MiB")
    assert fused <= unfused
