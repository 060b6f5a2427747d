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

from timesformer_kernels import backends, devices
from timesformer_kernels import triton as tk_triton
from timesformer_kernels.triton import target as tk_target
from timesformer_kernels.layout import spatial_groups, temporal_groups

# Every row of the device table, as Triton's compile target.
TARGETS = {name: GPUTarget(t.vendor, t.arch, t.warp_size) for name, t in devices.TARGETS.items()}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
# float32 under each torch.get_float32_matmul_precision() the kernels distinguish: "fp32" is the
# default "highest" (three TF32 products a dot), "tf32" is "high" (one; "medium" is the same)
PRECISIONS = {"fp32": "highest", "tf32": "high"}


@dataclasses.dataclass(frozen=True)
class Case:
    """A model shape whose launches the sweep compiles: qkv (B, [1 +] N·T, 3·H·Dh) in
    ``token_order``; temporal attention always (on ``qkv[:, 1:]`` when the model has a cls token
    that does not join the temporal groups, as in the official block), spatial attention for
    the TimeSformer models (``temporal``/``spatial`` say which the case has)."""

    name: str
    batch: int
    frames: int
    patches: int
    heads: int
    token_order: str = "space_major"
    spatial: bool = True
    temporal: bool = True
    cls_key: bool = False  # temporal attention with the cls key (lucidrains)
    about: str = ""


# Batches are small where the tensors are large: the batch changes no binary, only grids.
CASES = {c.name: c for c in (
    Case("base", 8, 8, 196, 12, about="TimeSformer-base, 8 frames at 224 px"),
    Case("hr", 4, 16, 784, 12, about="TimeSformer-HR, 16 frames at 448 px"),
    Case("l", 2, 96, 196, 12, about="TimeSformer-L, 96 frames at 224 px: temporal groups of 65-128"),
    Case("small", 8, 8, 49, 12, temporal=False,
         about="TimeSformer at 112 px: frame groups of 1 + 49, the whole-group backward on 4 warps"),
    Case("animatediff", 2, 16, 4096, 8, "time_major", spatial=False,
         about="AnimateDiff motion module: 16 frames of 64x64 latents, frame-major, temporal only"),
    Case("svd", 1, 25, 9216, 5, "time_major", spatial=False,
         about="Stable Video Diffusion temporal block: 25 frames of 72x128 latents"),
    Case("long", 1, 256, 16, 8, "time_major", spatial=False, cls_key=True,
         about="temporal groups longer than 128 with the cls key (lucidrains order): the flash kernels"),
)}


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


def record_launches(case: Case, head_dim: int, dtype: torch.dtype, target: str) -> list[Launch]:
    """The kernel launches of ``case``'s attention ops, forward and backward, as the package's
    wrappers make them for ``target`` (a name of ``TARGETS``). Tensors are allocated, never filled."""
    check_not_interpreting()
    scale = head_dim ** -0.5
    b, t, n, h = case.batch, case.frames, case.patches, case.heads
    has_cls = case.spatial or case.cls_key
    qkv = torch.empty(b, int(has_cls) + n * t, 3 * h * head_dim, dtype=dtype)
    calls = [(qkv if case.cls_key or not has_cls else qkv[:, 1:],
              temporal_groups(b, int(case.cls_key) + n * t, t, h, head_dim, case.token_order, case.cls_key))]
    calls = calls if case.temporal else []
    if case.spatial:
        calls.append((qkv, spatial_groups(b, 1 + n * t, t, h, head_dim, case.token_order)))
    with _recording() as launches, tk_target.compiling_for(target):
        for x, groups in calls:
            out, cls_out, lse, cls_lse = tk_triton.attention_fwd(x, groups, scale)
            dcls = None if cls_out is None else torch.empty_like(cls_out)
            tk_triton.attention_bwd(torch.empty_like(out), dcls, x, out, cls_out, lse, cls_lse, groups, scale)
    return launches


def configs(launch: Launch, target: str) -> list[triton.Config]:
    """The configs the autotuner would benchmark for this launch on ``target`` (after its
    pruning for that target), or the launch's own meta-parameters for a kernel without
    autotuning. Raises what the pruning raises when no config fits the target."""
    if isinstance(launch.kernel, Autotuner):
        launch.kernel.nargs = dict(zip(launch.kernel.arg_names, launch.args))
        with tk_target.compiling_for(target):
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


@dataclasses.dataclass
class Prepared:
    """One config of a recorded launch, bound and specialised for a target, not yet compiled."""

    source: ASTSource
    options: dict
    target: GPUTarget
    bound: dict
    grid: tuple[int, int, int]

    @property
    def key(self) -> tuple:
        """What decides the binary (Triton's own cache key, less its version): two launches
        with equal keys compile to the same kernel, so the sweep compiles it once."""
        backend = make_backend(self.target)
        return self.source.hash(), backend.parse_options(self.options).hash(), str(self.target)


def prepare(launch: Launch, config: triton.Config, target: GPUTarget) -> Prepared:
    """Binds one config of a recorded launch for ``target``, specialised like JITFunction.run."""
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
    grid = launch.grid(bound) if callable(launch.grid) else launch.grid
    grid = tuple(grid) + (1,) * (3 - len(grid))
    return Prepared(ASTSource(fn, signature, constexprs, attrs), options.__dict__, target, dict(bound), grid)


def compile_prepared(prepared: Prepared) -> Compiled:
    return Compiled(triton.compile(prepared.source, target=prepared.target, options=prepared.options),
                    prepared.bound, prepared.grid)


def compile_launch(launch: Launch, config: triton.Config, target: GPUTarget) -> Compiled:
    """triton.compile of one config of a recorded launch, specialised like JITFunction.run."""
    return compile_prepared(prepare(launch, config, target))
