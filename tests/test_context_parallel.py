"""tk.context_parallel on gloo (CPU): a clip's frames split over 2 and 4 processes.

Two spawns of processes for the whole module (2 and 4 ranks); each runs every case of its size
and saves what it computed; the tests compare with the upstream model (Hugging Face, diffusers,
unpatched) run here on the whole clip:

- Hugging Face TimeSformer in training with drop-path (fp64, the torch backend; fp32 with the
  Triton kernels under the interpreter): logits, every hidden state and every parameter gradient
  (two backward passes accumulated), with gradient checkpointing too, and TimesformerModel's
  tuple outputs in eval;
- blocks of the official structure (tests/official_block.py) in training: output and gradients;
- AnimateDiff's UNetMotionModel: the output and every parameter gradient;
- backend "auto" on CPU tensors (which runs the original code of a patched model where it
  measured faster) running the fused code instead (the official blocks, the UNet);
- copy.deepcopy of a context-parallel model (an EMA) training on the same group, and
  tk.unpatch of the copy leaving the original context-parallel;
- the relayouts of ``parallel.FrameSplit`` against the layout its docstring states;
- what autograd saves per rank against the unsharded model (<= 0.6x at P = 2);
- the bytes each rank sends per block, counted at the collectives, against the formula;
- torch.compile (aot_eager, fullgraph) of a context-parallel model;
- on a 2 x 2 (data x context) mesh: reduce_grads=False under FSDP2 and DDP over all ranks, and
  reduce_grads=True under DDP over the data ranks, give the gradients of the combined batch;
- the benchmark's rows on a tiny model.

Validation runs without processes, on torch.distributed's "fake" backend.
"""
import copy
import datetime
import functools
import os
import pickle
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import timesformer_kernels as tk
from timesformer_kernels import parallel
from timesformer_kernels.integrations import _common
from timesformer_kernels.integrations.context_parallel import STATE_ATTR

from official_block import TinyTimeSformer
from spawn import spawn_ranks

transformers = pytest.importorskip("transformers")
from transformers import TimesformerConfig, TimesformerForVideoClassification, TimesformerModel  # noqa: E402

try:
    import diffusers
except ImportError:  # the h200 stack has no diffusers: its cases skip
    diffusers = None

pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available"),
              pytest.mark.usefixtures("one_thread")]

FRAMES, PIXELS, BATCH = 4, (16, 24), 2  # a 2 x 3 patch grid: N = 6, split 3 + 3 over 2 ranks, 2 + 2 + 1 + 1 over 4
DIM, HEADS, CLASSES = 32, 2, 5
UNET_FRAMES = 8
F64 = dict(atol=1e-10, rtol=1e-10)
F32 = dict(atol=2e-4, rtol=2e-4)


# ------------------------------------------------------------------------------ models
def hf_model(cls=TimesformerForVideoClassification, dtype=torch.float64, drop_path=0.3, frames=FRAMES):
    config = TimesformerConfig(image_size=24, patch_size=8, num_channels=3, num_frames=frames, hidden_size=DIM,
                               num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=64,
                               num_labels=CLASSES)
    object.__setattr__(config, "drop_path_rate", drop_path)  # transformers 5 rejects 0.3 in the constructor
    torch.manual_seed(0)
    return perturbed(cls(config), dtype)


def perturbed(model, dtype):
    """Every parameter moved off its init (zero biases, zero-initialised projections)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype)


def unet_model():
    torch.manual_seed(0)
    unet = diffusers.UNetMotionModel(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=4, cross_attention_dim=12,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), num_attention_heads=2,
        motion_num_attention_heads=2, motion_max_seq_length=32)
    return perturbed(unet, torch.float64)


def video(seed=1, batch=BATCH, dtype=torch.float64):
    return torch.randn(batch, FRAMES, 3, *PIXELS, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def weighted(out):
    """A loss that weighs every output element differently."""
    return (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()


def clip_mean(logits):
    """A loss that is the mean over the clips of a per-clip loss (weights per class)."""
    return (logits * torch.linspace(-1, 1, CLASSES, dtype=logits.dtype)).sum(1).mean()


def grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def hf_train(model):
    """Logits and hidden states of a clip, the gradients after it, and after a second clip's
    backward accumulated onto them (drop-path draws from seeds 123 and 7)."""
    torch.manual_seed(123)
    out = model(video(1, dtype=model.dtype), output_hidden_states=True)
    weighted(out.logits).backward()
    first = grads(model)
    torch.manual_seed(7)
    weighted(model(video(2, dtype=model.dtype)).logits).backward()
    return {"logits": out.logits.detach(), "hidden": [h.detach() for h in out.hidden_states], "grads": first,
            "accumulated": grads(model)}


def hf_eval(model):
    """TimesformerModel in eval with return_dict=False: (last_hidden_state, hidden_states)."""
    with torch.no_grad():
        last, hidden = model.eval()(video(3), output_hidden_states=True, return_dict=False)
    return {"last": last, "hidden": list(hidden)}


def official_model():
    torch.manual_seed(0)
    return perturbed(TinyTimeSformer(dim=DIM, depth=2, num_heads=HEADS, drop_path_rate=0.3), torch.float64).train()


def official_run(model):
    """The official block structure on tokens (B, 1 + N·T, D), W = 3 patches a row, drop-path on."""
    tokens = torch.randn(BATCH, 1 + 6 * FRAMES, DIM, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.manual_seed(123)
    out = model(tokens, FRAMES, 3)
    weighted(out).backward()
    return {"out": out.detach(), "grads": grads(model)}


def unet_inputs():
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(BATCH, 4, UNET_FRAMES, 4, 4, generator=g, dtype=torch.float64)
    text = torch.randn(BATCH * UNET_FRAMES, 3, 12, generator=g, dtype=torch.float64)  # per frame, as pipelines pass it
    return sample, torch.tensor([10]), text


def unet_run(model):
    out = model(*unet_inputs()).sample
    weighted(out).backward()
    return {"out": out.detach(), "grads": grads(model)}


# ----------------------------------------------------------------- cases in the workers
def cp(model, backend="torch", **kwargs):
    return tk.context_parallel(tk.patch(model, backend=backend), **kwargs)


def case_hf_train(rank):
    return hf_train(cp(hf_model().train()))


def checkpointed(model):
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        enable()
    return model


def case_hf_checkpointing(rank):
    """Gradient checkpointing: the layers (and their collectives) recomputed in the backward."""
    calls, inner = [], _common.temporal_residual

    def counting(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    _common.temporal_residual = counting
    try:
        return {**hf_train(cp(checkpointed(hf_model().train()))), "temporal branches": len(calls)}
    finally:
        _common.temporal_residual = inner


def case_hf_triton(rank):
    """The Triton kernels (interpreter), fp32, one training step."""
    model = cp(hf_model(dtype=torch.float32).train(), backend="triton")
    torch.manual_seed(123)
    logits = model(video(1, dtype=torch.float32)).logits
    weighted(logits).backward()
    return {"logits": logits.detach(), "grads": grads(model)}


def case_hf_eval(rank):
    return hf_eval(cp(hf_model(TimesformerModel)))


def case_hf_copy(rank):
    """An EMA's copy.deepcopy of a context-parallel model trains like the unsharded model on the
    same group; tk.unpatch of the copy leaves the original context-parallel and the copy plain."""
    model = cp(hf_model().train())
    ema = copy.deepcopy(model)
    results = {"copy": hf_train(ema)}
    tk.unpatch(ema).zero_grad(set_to_none=True)
    return {**results, "original": hf_train(model), "unpatched copy": hf_train(ema)}


# backend "auto": on CPU tensors in training, a patched model runs the original code of both families
def case_official(rank):
    return official_run(cp(official_model(), backend="auto"))


def case_unet(rank):
    return unet_run(cp(unet_model(), backend="auto")) if diffusers is not None else None


def case_split(rank):
    """FrameSplit's relayouts against the layout of parallel.py's docstring, both token orders:
    rank r receives (P, T_l, B, N_r, C) = the time-major clip of its patches [n_r, n_r+1)."""
    split = parallel.FrameSplit(None)
    p, t, b, n, c = split.size, 2 * split.size, 2, 6, 3
    local = t // p
    start, stop = split.patch_range(n)
    errors = {}
    for order in ("space_major", "time_major"):
        # token (b, n, t) holds the value 1000·b + 10·n + t + 0.5·channel
        grid = (1000 * torch.arange(b).view(b, 1, 1, 1) + 10 * torch.arange(n).view(1, n, 1, 1)
                + torch.arange(t).view(1, 1, t, 1) + 0.5 * torch.arange(c)).double()  # (B, N, T, C)
        tokens = grid if order == "space_major" else grid.transpose(1, 2)
        full = torch.cat([torch.full((b, 1, c), -1.0, dtype=torch.float64), tokens.reshape(b, n * t, c)], 1)
        mine = split.shard_tokens(full, t, order)  # cls + this rank's frames
        mine_grid = grid[:, :, split.rank * local:(split.rank + 1) * local]
        want = mine_grid if order == "space_major" else mine_grid.transpose(1, 2)
        errors[f"{order} shard"] = (mine[:, 1:] - want.reshape(b, -1, c)).abs().max()
        errors[f"{order} gather"] = (split.gather_tokens(mine, local, order) - full).abs().max()
        columns = split.to_patch_split(mine[:, 1:], local, order)
        expected = grid[:, start:stop].permute(2, 0, 1, 3).reshape(1, -1, c)  # (T, B, N_r, C), time-major
        errors[f"{order} to_patch_split"] = (columns - expected).abs().max()
        back = split.to_frame_split(columns, b, n, order)
        errors[f"{order} round trip"] = (back - mine[:, 1:]).abs().max()
    return errors


def _saved_bytes(model, clip):
    """Bytes of the distinct storages autograd saves for backward in a forward, without the
    parameters and the input (the same with and without context parallelism)."""
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()} | {clip.untyped_storage().data_ptr()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    torch.manual_seed(123)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(clip)
    return sum(storages.values())


def case_saved(rank):
    return _saved_bytes(cp(hf_model(dtype=torch.float32).train()), video(1, dtype=torch.float32))


def case_sent(rank):
    """Bytes this rank sends in one forward of a 2-layer model, per collective, counted at the
    functional collectives (all-to-all: all rows but its own; ring all-reduce: 2·(P-1)/P of the data)."""
    import torch.distributed._functional_collectives as fc

    counted = []
    size = dist.get_world_size()
    real_all_to_all, real_all_reduce = fc.all_to_all_single, fc.all_reduce

    def all_to_all(x, out_sizes, in_sizes, group):
        rows = x.shape[0] // size if in_sizes is None else in_sizes[rank]
        counted.append(("all_to_all", (x.shape[0] - rows) * x[0].numel() * x.element_size()))
        return real_all_to_all(x, out_sizes, in_sizes, group)

    def all_reduce(x, op, group):
        counted.append(("all_reduce", 2 * (size - 1) / size * x.numel() * x.element_size()))
        return real_all_reduce(x, op, group)

    fc.all_to_all_single, fc.all_reduce = all_to_all, all_reduce
    try:
        with torch.no_grad():
            cp(hf_model(dtype=torch.float32).eval())(video(1, dtype=torch.float32))
    finally:
        fc.all_to_all_single, fc.all_reduce = real_all_to_all, real_all_reduce
    return counted


def case_compile(rank):
    """torch.compile(fullgraph=True, backend="aot_eager") of a context-parallel model: one graph,
    no recompilation on a second call, the eager outputs and gradients."""
    from torch._dynamo.testing import CompileCounterWithBackend

    results = {}
    counter = CompileCounterWithBackend("aot_eager")
    for name, model in (("eager", cp(hf_model().eval())), ("compiled", cp(hf_model().eval()))):
        run = torch.compile(model, backend=counter, fullgraph=True) if name == "compiled" else model
        for clip in (1, 2):
            logits = run(video(clip)).logits
            weighted(logits).backward()
        results[name] = {"logits": logits.detach(), "grads": list(grads(model).values())}
    results["frames"] = counter.frame_count
    return results


def case_bench(rank):
    """The benchmark's rows on tiny models (gloo, CPU): every step timed."""
    from benchmarks.context_parallel import measure

    families = ("hf", "animatediff") if diffusers is not None else ("hf",)
    return {f: measure(f, 4, True, torch.device("cpu"), 0, 1) for f in families}


def case_compose(rank):
    """A 2 x 2 (data x context) mesh: each data rank trains on its half of the batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("data", "context"))
    half = slice(2 * mesh["data"].get_local_rank(), 2 * mesh["data"].get_local_rank() + 2)
    clips = video(5, batch=4)[half]
    results = {}
    for name in ("fsdp2", "ddp_world", "ddp_data"):
        model = hf_model(drop_path=0.0).train()
        if name == "fsdp2":  # HSDP: replicated over data, sharded over context, averages over all ranks
            model = cp(model, group=mesh["context"], reduce_grads=False)
            fully_shard(model, mesh=mesh)
        elif name == "ddp_world":
            model = DDP(cp(model, group=mesh["context"], reduce_grads=False))
        else:  # the context ranks average, then DDP over the data ranks
            model = DDP(cp(model, group=mesh["context"]), process_group=mesh["data"].get_group())
        clip_mean(model(clips).logits).backward()
        results[name] = {k.removeprefix("module."): (p.grad.full_tensor() if hasattr(p.grad, "full_tensor")
                                                     else p.grad).clone() for k, p in model.named_parameters()}
    return results


CASES = {2: (case_hf_train, case_hf_checkpointing, case_hf_triton, case_hf_eval, case_hf_copy, case_official, case_unet,
             case_split, case_saved, case_sent, case_compile, case_bench),
         4: (case_hf_train, case_official, case_unet, case_split, case_sent, case_compose)}


def _worker(world, rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        for case in CASES[world]:
            try:
                results[case.__name__] = case(rank)
            except Exception:  # every rank raises alike (same inputs), so the others do not hang
                results[case.__name__] = RuntimeError(f"rank {rank}:\n{traceback.format_exc()}")
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(world, tmp_path_factory):
    return spawn_ranks(functools.partial(_worker, world), world, tmp_path_factory.mktemp(f"cp{world}"))


@pytest.fixture(scope="module")
def ranks2(tmp_path_factory):
    return _spawn(2, tmp_path_factory)


@pytest.fixture(scope="module")
def ranks4(tmp_path_factory):
    return _spawn(4, tmp_path_factory)


@pytest.fixture(params=[2, 4], ids=["P2", "P4"])
def ranks(request):
    return request.getfixturevalue(f"ranks{request.param}")


def results_of(ranks, case):
    out = [r[case.__name__] for r in ranks]
    for result in out:
        if isinstance(result, Exception):
            raise result
    return out


def assert_close_tree(got, want, tol, where=""):
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            assert_close_tree(got[k], want[k], tol, f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close_tree(g, w, tol, f"{where}[{i}]")
    else:
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{where}: {m}")


# --------------------------------------------------------------------------------- tests
def test_hf_training_matches_upstream(ranks):
    """Drop-path in training, fp64: logits, every hidden state (gathered), every parameter
    gradient, and gradients accumulated over two backward passes, on every rank."""
    want = hf_train(hf_model().train())
    assert len(want["grads"]) == len(list(hf_model().parameters()))
    for result in results_of(ranks, case_hf_train):
        assert_close_tree(result, want, F64)


def test_hf_gradient_checkpointing(ranks2):
    want = hf_train(checkpointed(hf_model().train()))
    for result in results_of(ranks2, case_hf_checkpointing):
        assert result.pop("temporal branches") == 8  # 2 layers, 2 clips, each recomputed in the backward
        assert_close_tree(result, want, F64)


def test_hf_triton_kernels(ranks2):
    model = hf_model(dtype=torch.float32).train()
    torch.manual_seed(123)
    logits = model(video(1, dtype=torch.float32)).logits
    weighted(logits).backward()
    for result in results_of(ranks2, case_hf_triton):
        assert_close_tree(result, {"logits": logits.detach(), "grads": grads(model)}, F32)


def test_hf_model_tuple_outputs(ranks2):
    want = hf_eval(hf_model(TimesformerModel))
    for result in results_of(ranks2, case_hf_eval):
        assert_close_tree(result, want, F64)


def test_hf_deepcopy(ranks2):
    want = hf_train(hf_model().train())
    for result in results_of(ranks2, case_hf_copy):
        assert_close_tree(result, {"copy": want, "original": want, "unpatched copy": want}, F64)


def test_official_structure(ranks):
    """Blocks of the official structure in training with drop-path, fp64: output and gradients
    (backend "auto" on CPU tensors: fused, not the original code on this rank's frames)."""
    want = official_run(official_model())
    for result in results_of(ranks, case_official):
        assert_close_tree(result, want, F64)


@pytest.mark.skipif(diffusers is None, reason="diffusers is not installed")
def test_unet_motion_model(ranks):
    """The whole UNet, fp64: its output and every parameter gradient (7 motion modules; backend
    "auto" on CPU tensors: fused, not the original code on this rank's frames)."""
    want = unet_run(unet_model())
    for result in results_of(ranks, case_unet):
        assert_close_tree(result, want, F64)


def test_relayouts(ranks):
    for errors in results_of(ranks, case_split):
        assert all(err == 0 for err in errors.values()), errors


def test_saved_for_backward(ranks2):
    """Per rank at P = 2, at most 0.6x what the unsharded patched model saves."""
    whole = _saved_bytes(tk.patch(hf_model(dtype=torch.float32).train(), backend="torch"),
                         video(1, dtype=torch.float32))
    per_rank = results_of(ranks2, case_saved)
    assert all(b <= 0.6 * whole for b in per_rank), (per_rank, whole)


def test_bytes_sent_per_block(ranks):
    """Per layer: two all-to-alls moving the temporal branch's D channels (all but the rank's own
    patches) and the cls token's all-reduce, as benchmarks.context_parallel.sent_bytes has it."""
    from benchmarks.context_parallel import sent_bytes

    n, layers = (PIXELS[0] // 8) * (PIXELS[1] // 8), 2
    for rank, counted in enumerate(results_of(ranks, case_sent)):
        size = len(ranks)
        kinds = [kind for kind, _ in counted]
        assert kinds == ["all_to_all", "all_to_all", "all_reduce"] * layers, kinds
        per_block = sum(b for _, b in counted) / layers
        assert per_block == pytest.approx(sent_bytes("frame_split", BATCH, n, FRAMES, DIM, size, 4, rank), rel=1e-12)
        ulysses = sent_bytes("ulysses", BATCH, n, FRAMES, DIM, size, 4, rank)
        assert per_block < (0.55 if size == 2 else 0.75) * ulysses  # half, less the uneven split's imbalance


def test_compile(ranks2):
    for result in results_of(ranks2, case_compile):
        assert result["frames"] == 1
        assert_close_tree(result["compiled"], result["eager"], F64)


def test_compositions_on_a_data_by_context_mesh(ranks4):
    """Each of the 4 ranks holds the unsharded model's gradient of the combined batch (4 clips)."""
    model = hf_model(drop_path=0.0).train()
    clip_mean(model(video(5, batch=4)).logits).backward()
    want = grads(model)
    for result in results_of(ranks4, case_compose):
        for name in ("fsdp2", "ddp_world", "ddp_data"):
            assert_close_tree(result[name], want, F64, name)


def test_benchmark_rows(ranks2):
    for result in results_of(ranks2, case_bench):
        for family, measured in result.items():
            assert len(measured["times"]) == 1 and measured["times"][0] > 0, family


# ---------------------------------------------------------------- validation, no processes
@pytest.fixture
def fake_world():
    """A default process group of ``size`` ranks on torch's "fake" backend (no processes, no data moves)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def init(size):
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)

    yield init
    if dist.is_initialized():
        dist.destroy_process_group()


def test_not_patched():
    with pytest.raises(ValueError, match=r"model: layers \[0, 1\] of TimesformerEncoder are not patched"):
        tk.context_parallel(hf_model())
    with pytest.raises(ValueError, match=r"model: blocks \[0, 1\] of TinyTimeSformer are not patched"):
        tk.context_parallel(official_model())
    with pytest.raises(ValueError, match="found nothing it supports in Sequential"):
        tk.context_parallel(nn.Sequential(nn.Linear(2, 2)))


def test_bad_arguments(fake_world):
    model = tk.patch(hf_model(), backend="torch")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        tk.context_parallel("model")
    with pytest.raises(TypeError, match="reduce_grads must be a bool"):
        tk.context_parallel(model, reduce_grads=1)
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        tk.context_parallel(model)
    fake_world(4)
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup, a 1-D DeviceMesh or None"):
        tk.context_parallel(model, group=[0, 1])
    from torch.distributed.device_mesh import init_device_mesh

    with pytest.raises(ValueError, match="a DeviceMesh must be 1-D"):
        tk.context_parallel(model, group=init_device_mesh("cpu", (2, 2)))


def test_frames_not_divisible(fake_world):
    fake_world(2)
    with pytest.raises(ValueError, match=r"num_frames \(3\) must be divisible by the context-parallel group size "
                                         r"\(2\)"):
        tk.context_parallel(tk.patch(hf_model(frames=3), backend="torch"))


@pytest.mark.skipif(diffusers is None, reason="diffusers is not installed")
def test_unet_frames_not_divisible_at_call(fake_world):
    fake_world(2)
    unet = cp(unet_model())
    sample, timestep, text = unet_inputs()
    with pytest.raises(ValueError, match=r"num_frames \(3\) must be divisible .* \(2\)"):
        unet(sample[:, :, :3], timestep, text[:BATCH * 3])


def fused_forwards(model):
    return [f for f in map(_common.fused_forward_of, model.modules()) if f is not None]


def test_group_of_one_is_the_patched_model(fake_world):
    fake_world(1)
    model = tk.patch(hf_model(), backend="torch")
    attributes = set(model.__dict__)
    assert tk.context_parallel(model) is model
    assert set(model.__dict__) == attributes and [f.split for f in fused_forwards(model)] == [None, None]
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_fallbacks_raise(fake_world):
    """A call the fused path would hand to the original code raises: the original cannot run on a
    split of the frames (checked before any collective runs). So does a module changed after
    tk.context_parallel (checked at every call, like tk.patch's)."""
    fake_world(2)
    model = cp(hf_model())
    with pytest.raises(ValueError, match="under tk.context_parallel: .*output_attentions=True"):
        model(video(), output_attentions=True)
    model.timesformer.encoder.layer[0].attention.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match=r"TimesformerLayer under tk.context_parallel: .*hooks .* on attention "):
        model(video())


def test_auto_on_cpu_runs_fused(fake_world):
    """backend "auto" runs the original code on CPU tensors where it measured faster (a Hugging
    Face layer in training), but never on this rank's frames under tk.context_parallel."""
    fake_world(2)
    model, x = tk.patch(hf_model().train()), torch.zeros(1)
    assert all(f.runs_original_on_cpu(x) for f in fused_forwards(model))
    tk.context_parallel(model)
    assert not any(f.runs_original_on_cpu(x) for f in fused_forwards(model))


def test_unpatch_undoes_it(fake_world):
    fake_world(2)
    reference = hf_model().eval()
    model = cp(hf_model().eval())
    fused = fused_forwards(model)
    with pytest.raises(ValueError, match="already context-parallel"):
        tk.context_parallel(model)
    tk.unpatch(model)
    assert STATE_ATTR not in model.__dict__ and not fused_forwards(model)
    assert [f.split for f in fused] == [None, None]
    assert not model.timesformer.encoder._forward_pre_hooks and not model.timesformer.encoder._forward_hooks
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())
    torch.testing.assert_close(model(video()).logits, reference(video()).logits, **F64)


def installed(model):
    """What tk.context_parallel installed in ``model``: its split, the fused forwards' splits,
    the hooks of the encoder, and whether every parameter's gradient is averaged."""
    state, encoder = model.__dict__.get(STATE_ATTR), model.timesformer.encoder
    return (state and state.split, [f.split for f in fused_forwards(model)],
            len(encoder._forward_pre_hooks) + len(encoder._forward_hooks),
            all(p._post_accumulate_grad_hooks for p in model.parameters()))


def test_deepcopy_shares_the_group_and_pickling_is_refused(fake_world):
    """An EMA's copy.deepcopy is context-parallel over the same group (its own hooks, its
    parameters' gradients averaged); tk.unpatch of the copy leaves the original as it was."""
    fake_world(2)
    model = cp(hf_model())
    split = model.__dict__[STATE_ATTR].split
    ema = copy.deepcopy(model)
    assert installed(ema) == installed(model) == (split, [split, split], 2, True)
    assert all(f.module is layer for f, layer in zip(fused_forwards(ema), ema.timesformer.encoder.layer))
    tk.unpatch(ema)
    assert installed(ema) == (None, [], 0, False)
    assert installed(model) == (split, [split, split], 2, True)
    with pytest.raises(TypeError, match="a context-parallel model holds a process group: it cannot be pickled"):
        pickle.dumps(model)
