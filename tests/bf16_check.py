"""Checks shared by the swap-in tests' GPU runs (bf16 autocast on CUDA, patched vs unpatched)."""
import contextlib

import torch

BF16_EPS = 1e-3  # slack of the fp32-reference criterion, relative to the reference's max, below bf16's 2**-8


@contextlib.contextmanager
def ieee_fp32():
    """Full fp32 matmuls and convolutions (no TF32) while the fp32 reference runs."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def assert_kernels_ran(resolved, backend, calls):
    """``calls`` fused op calls ran a GPU kernel: the backend asked for, or (auto) not the torch fallback."""
    assert len(resolved) == calls, resolved
    expected = {backend} if backend != "auto" else {"triton", "cuda"}
    assert set(resolved) <= expected, resolved


def assert_bf16_equivalent(got, ref, exact=None):
    """``got`` (patched) and ``ref`` (unpatched), {name: tensor} of one bf16-autocast pass each.

    With ``exact``, the unpatched model's pass in full fp32 (eval mode), the flash-attention
    test criterion: the patched bf16 result may be off the fp32 one by at most twice what the
    unpatched bf16 result is off it, plus BF16_EPS of its scale, per tensor (max abs error):
    the fused path must be no less accurate than the code it replaces, whatever the tensor's
    own bf16 sensitivity. Without it (train mode: drop-path and dropout draw their masks in
    the branch's dtype, bf16 here, so an fp32 run may keep other samples), plain relative error
    vs the unpatched bf16 pass: max |got - ref| / max |ref| <= 2e-2 for outputs, 5e-2 for
    gradients (the patched pass draws the same masks as the unpatched one).
    """
    assert got.keys() == ref.keys()
    bad = []
    for name, want in ref.items():
        have = got[name]
        if not torch.isfinite(have).all():
            bad.append(f"{name}: not finite")
        elif exact is None:
            tol = 2e-2 if name.startswith("out") else 5e-2
            err, scale = (have - want).abs().max().item(), want.abs().max().item()
            if err > tol * scale:
                bad.append(f"{name}: max error {err:.3e} > {tol} x max {scale:.3e}")
        else:
            truth = exact[name]
            err, base = (have - truth).abs().max().item(), (want - truth).abs().max().item()
            scale = truth.abs().max().item()
            if err > 2 * base + BF16_EPS * scale:
                bad.append(f"{name}: error vs fp32 {err:.3e} > 2 x unpatched bf16's {base:.3e} "
                           f"+ {BF16_EPS} x max {scale:.3e}")
    assert not bad, f"{len(bad)} of {len(ref)} tensors:\n" + "\n".join(bad)


def gpu_pass(model, forward, x, bf16: bool, seed: int, input_grad: bool = True, allow_unused: bool = False):
    """{output name: output, 'input': x's gradient (with ``input_grad``), parameter name: its
    gradient} of one forward on CUDA (under bf16 autocast, or in full fp32) and the backward of
    a fixed weighting of the outputs; ``forward(model, x)`` returns {output name: tensor}.
    ``allow_unused`` drops parameters the outputs do not depend on instead of failing."""
    x = x.detach().requires_grad_(input_grad)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with ieee_fp32():
        torch.manual_seed(seed)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            outs = {name: o.float() for name, o in forward(model, x).items()}
        loss = sum((o * torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)).sum() for o in outs.values())
        grads = list(torch.autograd.grad(loss, ([x] if input_grad else []) + [p for _, p in named],
                                         allow_unused=allow_unused))
    result = {name: o.detach() for name, o in outs.items()}
    if input_grad:
        result["input"] = grads.pop(0)
    result.update((n, g) for (n, _), g in zip(named, grads) if g is not None)
    return result


def check_patched_bf16(model, patched, forward, x, train: bool, seed: int, **options):
    """The patched model's bf16 pass vs the unpatched one's (and, in eval, vs its fp32 pass)."""
    ref = gpu_pass(model, forward, x, True, seed, **options)
    got = gpu_pass(patched, forward, x, True, seed, **options)
    exact = None if train else gpu_pass(model, forward, x, False, seed, **options)
    assert_bf16_equivalent(got, ref, exact)
