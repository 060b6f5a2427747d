"""Test set-up: Triton runs under its CPU interpreter when there is no GPU, and tests import
the independent reference from this folder."""
import os
import sys
import warnings

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported, so that @triton.jit builds interpreted kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def fresh_warnings(monkeypatch):
    """The swap-in warns once per process and reason: start a test with none emitted yet."""
    from timesformer_kernels.integrations import _common

    monkeypatch.setattr(_common, "_warned", set())


@pytest.fixture
def fallback_warnings(fresh_warnings):
    """Yields a function returning the messages of this package's fallback warnings so far
    (other warnings, e.g. deprecations, are ignored)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield lambda: [str(w.message) for w in caught if str(w.message).startswith("timesformer_kernels")]


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused temporal branches run by the Hugging Face / official swap-ins."""
    from timesformer_kernels.integrations import _common

    calls = []
    inner = _common.temporal_residual

    def counting(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(_common, "temporal_residual", counting)
    return calls


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and contend on a busy CI box)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def resolved_backends(monkeypatch):
    """The backend each fused attention op call resolved to (what backend='auto' picked)."""
    from timesformer_kernels import backends

    names = []
    choose = backends.choose

    def recording(backend, qkv, groups):
        names.append(choose(backend, qkv, groups))
        return names[-1]

    monkeypatch.setattr(backends, "choose", recording)
    return names
