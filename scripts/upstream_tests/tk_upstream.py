"""Run transformers' and diffusers' own test suites on patched models (scripts/upstream_tests.sh).

As a pytest plugin (``-p tk_upstream``), it calls ``tk.patch(model, backend="torch")`` on every
model right after it is built: transformers' ``PreTrainedModel.post_init`` (the end of every
model's ``__init__``), diffusers' ``ModelMixin`` at its first call (models nest: a pipeline's
UNet patches its temporal transformers). Models with nothing to patch are left alone. The
session's summary says how many models were patched, how many fused op calls ran and how many
fallback warnings were given.

As a script, ``python tk_upstream.py BASELINE.xml PATCHED.xml`` compares two JUnit reports:
it lists the tests that pass in the baseline and not patched, and exits 1 if there are any.
"""
from __future__ import annotations

import collections
import sys
import warnings
import xml.etree.ElementTree as ET

_stats = collections.Counter()


def _patch(model) -> None:
    import timesformer_kernels as tk

    try:
        tk.patch(model, backend="torch")
    except ValueError:  # nothing divided/temporal to patch in this model
        return
    _stats["models patched"] += 1


def pytest_configure(config):
    try:
        from transformers import PreTrainedModel
    except ImportError:
        pass
    else:
        post_init = PreTrainedModel.post_init

        def patched_post_init(self, *args, **kwargs):
            post_init(self, *args, **kwargs)
            _patch(self)

        PreTrainedModel.post_init = patched_post_init
    try:
        from diffusers import ModelMixin
    except ImportError:
        pass
    else:
        import torch

        def patched_call(self, *args, **kwargs):
            if not self.__dict__.get("_tk_upstream_seen"):
                self.__dict__["_tk_upstream_seen"] = True
                _patch(self)
            return torch.nn.Module.__call__(self, *args, **kwargs)

        ModelMixin.__call__ = patched_call
    from timesformer_kernels import backends

    choose = backends.choose

    def counting(backend, qkv, groups):
        _stats["fused op calls"] += 1
        return choose(backend, qkv, groups)

    backends.choose = counting
    show = warnings.showwarning

    def counting_warnings(message, *args, **kwargs):
        if str(message).startswith("timesformer_kernels"):
            _stats["fallback warnings"] += 1
        return show(message, *args, **kwargs)

    warnings.showwarning = counting_warnings


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line("tk_upstream: " + ", ".join(f"{k} {v}" for k, v in sorted(_stats.items())))


def _outcomes(path: str) -> dict:
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcomes[name] = ("failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds
                          else "passed")
    return outcomes


def main(argv) -> int:
    baseline, patched = (_outcomes(p) for p in argv[1:3])
    counts = {label: collections.Counter(o.values()) for label, o in (("baseline", baseline), ("patched", patched))}
    for label, c in counts.items():
        print(f"{label}: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped")
    regressions = sorted(n for n, o in baseline.items() if o == "passed" and patched.get(n) != "passed")
    for name in regressions:
        print(f"REGRESSION {name}: {patched.get(name, 'missing')}")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
