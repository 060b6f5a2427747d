"""Load mmaction2's ``models/common/transformer.py`` on its own, without importing the
``mmaction.models`` package (the 1.2.0 wheel does not import as a package here: a missing
submodule, and a clash with transformers 5). The file itself only needs ``mmaction.registry``,
mmcv (``mmcv-lite``) and mmengine.

    pip install --no-deps mmaction2==1.2.0 mmengine 'mmcv-lite<2.2' importlib_metadata
    pip install opencv-python-headless addict yapf termcolor   # what mmcv/mmengine import

``load_mmaction_transformer()`` returns the loaded module (cached), or raises ImportError
naming what is missing; ``mmaction_available()`` says whether it can be loaded.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
import warnings

MODULE_NAME = "tk_tests_mmaction_transformer"


@functools.lru_cache(maxsize=None)
def load_mmaction_transformer():
    """The module object of mmaction2's ``models/common/transformer.py``."""
    spec = importlib.util.find_spec("mmaction")  # finds the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("mmaction2 is not installed (pip install --no-deps mmaction2==1.2.0 ...)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", "common", "transformer.py")
    if not os.path.exists(path):
        raise ImportError(f"mmaction2 has no {path}")
    file_spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    module = importlib.util.module_from_spec(file_spec)
    with warnings.catch_warnings():
        # mmcv-lite warns that its compiled ops (deformable attention) are missing: not needed here.
        warnings.simplefilter("ignore")
        file_spec.loader.exec_module(module)
    sys.modules[MODULE_NAME] = module
    return module


def mmaction_available() -> bool:
    try:
        load_mmaction_transformer()
    except Exception:  # ImportError, or an incompatible mmcv/mmengine asserting at import
        return False
    return True
