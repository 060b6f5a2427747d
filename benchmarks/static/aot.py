"""Ahead-of-time compiles of the package's Triton kernels, specialised the way a real launch is.

The launches are captured, not rebuilt: the package's own wrappers
(``timesformer_kernels.triton.attention_fwd`` / ``attention_bwd``) run on CPU tensors of the
benchmark shapes while every kernel object of ``timesformer_kernels.triton`` has its ``run``
replaced by a recorder, so the arguments, constexprs and grid are exactly what the wrapper
would launch. Each recorded launch is then bound by the JIT function's own binder for an
explicit ``GPUTarget`` (pointers 16-byte aligned and integers divisible by 16 get
``tt.divisibility=16``, integers equal to 1 become constants), and compiled with
``triton.compile`` for every autotune config its pruning keeps.

Private Triton APIs used (pinned by tests/test_static_report.py on Triton 3.6 and 3.8):
``runtime.jit.create_function_from_signature``, ``JITFunction._pack_args``,
``compiler.make_backend``, ``Autotuner.prune_configs`` / ``.nargs``, ``Heuristics.values``.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import inspect
import os
import pkgutil
import textwrap

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import JITFunction, KernelInterface, create_function_from_signature

from timesformer_kernels import backends
from timesformer_kernels import triton as tk_triton
from timesformer_kernels.triton import target as tk_target
from timesformer_kernels.layout import spatial_groups, temporal_groups

TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def tool(name: str) -> str | None:
    """Path of a CUDA tool Triton bundles (ptxas, cuobjdump), or None."""
    path = os.path.join(os.path.dirname(importlib.import_module("triton.backends.nvidia").__file__), "bin", name)
    return path if os.access(path, os.X_OK) else None


def check_not_interpreting() -> None:
    if backends.interpreting():
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels were built for the interpreter, without their "
                           "autotune configs. Run the static report without it.")


def kernel_modules() -> list:
    """Every submodule of timesformer_kernels.triton (the kernels are discovered, not listed)."""
    names = [m.name for m in pkgutil.iter_modules(tk_triton.__path__)]
    return [importlib.import_module(f"{tk_triton.__name__}.{name}") for name in names]


@dataclasses.dataclass
class Launch:
    """One kernel launch as the package's wrapper makes it."""

    kernel: KernelInterface  # what the wrapper indexes with [grid]: an Autotuner or a JITFunction
    args: tuple
    kwargs: dict
    grid: object  # tuple, or callable(bound args) -> tuple

    @property
    def jit(self) -> JITFunction:
        fn = self.kernel
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        return fn

    @property
    def name(self) -> str:
        return self.jit.fn.__name__


@contextlib.contextmanager
def _recording():
    """Replaces ``run`` of every kernel object in the package's Triton modules by a recorder."""
    launches: list[Launch] = []
    patched = []
    for module in kernel_modules():
        for obj in vars(module).values():
            if isinstance(obj, KernelInterface) and "run" not in vars(obj):
                def record(*args, grid, warmup=False, _obj=obj, **kwargs):
                    launches.append(Launch(_obj, args, kwargs, grid))

                obj.run = record
                patched.append(obj)
    try:
        yield launches
    finally:
        for obj in patched:
            del obj.run


def record_launches(batch: int, frames: int, patches: int, heads: int, head_dim: int, dtype: torch.dtype,
                    target: GPUTarget) -> list[Launch]:
    """The kernel launches of temporal and spatial attention, forward and backward, on a qkv of
    the model's layout (B, 1 + N·T, 3·H·Dh), space-major, as a GPU of ``target``'s generation
    would make them; temporal reads the patch rows ``qkv[:, 1:]`` like the official block.
    Tensors are allocated, never filled."""
    check_not_interpreting()
    scale = head_dim ** -0.5
    qkv = torch.empty(batch, 1 + patches * frames, 3 * heads * head_dim, dtype=dtype)
    tgroups = temporal_groups(batch, patches * frames, frames, heads, head_dim, "space_major", False)
    sgroups = spatial_groups(batch, 1 + patches * frames, frames, heads, head_dim, "space_major")
    with _recording() as launches, tk_target.compiling_for(target.arch // 10):
        for x, groups in ((qkv[:, 1:], tgroups), (qkv, sgroups)):
            out, cls_out, lse, cls_lse = tk_triton.attention_fwd(x, groups, scale)
            dcls = None if cls_out is None else torch.empty_like(cls_out)
            tk_triton.attention_bwd(torch.empty_like(out), dcls, x, out, cls_out, lse, cls_lse, groups, scale)
    return launches


def configs(launch: Launch, target: GPUTarget) -> list[triton.Config]:
    """The configs the autotuner would benchmark for this launch on ``target`` (after its
    pruning, which drops Hopper-only configs before sm_90), or the launch's own
    meta-parameters for a kernel without autotuning."""
    if isinstance(launch.kernel, Autotuner):
        launch.kernel.nargs = dict(zip(launch.kernel.arg_names, launch.args))
        with tk_target.compiling_for(target.arch // 10):
            return list(launch.kernel.prune_configs(dict(launch.kwargs)))
    return [triton.Config({})]


def source_loops(fn: JITFunction) -> int:
    """Number of ``for`` loops in the kernel's own source (helpers it calls are inlined but not
    counted; they have no loops here)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn.fn)))
    return sum(isinstance(node, ast.For) for node in ast.walk(tree))


@dataclasses.dataclass
class Compiled:
    kernel: object  # triton.compiler.CompiledKernel
    bound: dict  # argument name -> value, meta-parameters included
    grid: tuple[int, int, int]


def compile_launch(launch: Launch, config: triton.Config, target: GPUTarget) -> Compiled:
    """triton.compile of one config of a recorded launch, specialised like JITFunction.run."""
    from triton import knobs

    kwargs = {**launch.kwargs, **config.all_kwargs()}
    kernel = launch.kernel
    while not isinstance(kernel, JITFunction):  # meta-parameters a Heuristics would add
        if isinstance(kernel, Heuristics):
            for name, heur in kernel.values.items():
                kwargs[name] = heur({**dict(zip(kernel.arg_names, launch.args)), **kwargs})
        kernel = kernel.fn
    fn = kernel
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    grid = launch.grid(bound) if callable(launch.grid) else launch.grid
    grid = tuple(grid) + (1,) * (3 - len(grid))
    return Compiled(compiled, dict(bound), grid)
