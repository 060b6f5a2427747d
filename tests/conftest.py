"""Test set-up: Triton runs under its CPU interpreter when there is no GPU, and tests import
the independent reference from this folder."""
import os
import sys

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
