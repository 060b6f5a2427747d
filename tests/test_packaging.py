"""Packaging: ``python -m build`` makes an sdist and a wheel (TK_BUILD_CUDA=0) from a clean
copy of the repository; the wheel installs with pip into a fresh virtual environment and
imports there without a GPU (``__version__``, ``info()``, the ``python -m
timesformer_kernels`` CLI, a CPU call); the metadata declares the dependencies the code
really imports and the Python version it parses under.

The fresh venv has no packages of its own; a .pth file makes this interpreter's
site-packages (torch, triton) visible to it. Directories named in a .pth are not scanned for
.pth files themselves, so the editable install of the repository is not active there: the
import must come from the installed wheel.
"""
import ast
import email.parser
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
NAME, DIST = "timesformer_kernels", "timesformer_kernels"  # import name, dist file prefix


def _version():
    return (ROOT / NAME / "_version.py").read_text().split('"')[1]


def _source_files():
    """The files of a checkout: tracked plus untracked-but-not-ignored (no venv, builds, .so)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             check=True, capture_output=True).stdout
        files = [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]
        if files:
            return files
    except (OSError, subprocess.CalledProcessError):
        pass
    skip = {".git", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks"}
    return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
            if p.is_file() and not skip.intersection(p.relative_to(ROOT).parts)
            and not any(part.startswith(".venv") for part in p.relative_to(ROOT).parts)
            and not p.name.endswith((".so", ".pyc")) and ".egg-info" not in str(p)]


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "PYTHONHOME")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel) built from a clean copy of the repository."""
    tmp = tmp_path_factory.mktemp("pkg")
    src, out = tmp / "src", tmp / "dist"
    for f in _source_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    env = _env(TK_BUILD_CUDA="0")
    if importlib.util.find_spec("build") is not None:
        # No isolation: the build uses this environment's setuptools (no package index needed).
        # pyproject.toml also lists "wheel", which setuptools >= 70.1 no longer needs.
        _run([sys.executable, "-m", "build", "--no-isolation", "--skip-dependency-check", "--outdir", str(out),
              str(src)], env=env, cwd=tmp)
    else:  # the same PEP 517 hooks ``build`` calls: sdist, then the wheel from the unpacked sdist
        hooks = ("import setuptools.build_meta as b, sys; "
                 "print(getattr(b, sys.argv[1])(sys.argv[2]))")
        name = _run([sys.executable, "-c", hooks, "build_sdist", str(out)], env=env, cwd=src).stdout.split()[-1]
        with tarfile.open(out / name) as tar:
            try:
                tar.extractall(tmp / "unpacked", filter="data")
            except TypeError:  # Python < 3.10.12 / 3.11.4: no extraction filters
                tar.extractall(tmp / "unpacked")
        unpacked = next((tmp / "unpacked").iterdir())
        _run([sys.executable, "-c", hooks, "build_wheel", str(out)], env=env, cwd=unpacked)
    sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(out.iterdir())
    return sdists[0], wheels[0]


def _package_modules():
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / NAME).rglob("*.py"))


def test_wheel_contents_and_metadata(dists):
    _, wheel = dists
    version = _version()
    assert wheel.name == f"{DIST}-{version}-py3-none-any.whl", wheel.name  # pure Python without the extension
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = email.parser.Parser().parsestr(zf.read(f"{DIST}-{version}.dist-info/METADATA").decode())
    missing = [m for m in _package_modules() if m not in names]
    assert not missing, f"modules missing from the wheel: {missing}"
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "csrc/")) or n.endswith(".so")], names
    assert meta["Name"] in ("timesformer-kernels", "timesformer_kernels") and meta["Version"] == version
    assert meta["Requires-Python"] and "3.10" in meta["Requires-Python"], meta["Requires-Python"]
    requires = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    # The supported range (README, "Supported versions"): both ends in, the neighbours out.
    torch_req = next(r for r in requires if r.name == "torch" and r.marker is None)
    assert {"2.11.0", "2.14.1"} <= set(torch_req.specifier.filter(["2.10.0", "2.11.0", "2.14.1", "2.15.0"])), torch_req
    assert not set(torch_req.specifier.filter(["2.10.0", "2.15.0"])), torch_req
    triton_req = next(r for r in requires if r.name == "triton")
    assert triton_req.marker.evaluate({"extra": "triton"}), triton_req
    assert set(triton_req.specifier.filter(["3.5.0", "3.6.0", "3.8.0", "3.9.0"])) == {"3.6.0", "3.8.0"}, triton_req


def test_declared_dependencies_cover_imports():
    """Module-level imports are the standard library, torch, or (only in the triton subpackage,
    an optional extra) triton; every module parses as Python 3.10, the declared minimum."""
    allowed = set(sys.stdlib_module_names) | {"torch", NAME, "__future__"}
    for rel in _package_modules():
        tree = ast.parse((ROOT / rel).read_text(), filename=rel, feature_version=(3, 10))
        for node in tree.body:  # module level only: imports inside functions are optional paths
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                top = name.split(".")[0]
                ok = top in allowed or (top == "triton" and rel.startswith(f"{NAME}/triton/"))
                assert ok, f"{rel}:{node.lineno} imports {name}, which the package does not declare"


def test_sdist_can_build_the_extension(dists):
    """The sdist carries everything ``setup.py`` needs for the CUDA extension (csrc sources and
    headers), so ``pip install`` of it on a GPU machine can build ``_C``, and the package."""
    sdist, _ = dists
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    csrc = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").iterdir()
                  if p.suffix in (".cu", ".cpp", ".h", ".cuh"))
    need = ["setup.py", "pyproject.toml", "README.md", *_package_modules(), *csrc]
    missing = [n for n in need if n not in names]
    assert not missing, f"missing from the sdist: {missing}"


def test_wheel_installs_and_imports_without_gpu(dists, tmp_path):
    _, wheel = dists
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, clear=True).create(env_dir)
    py = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    parents = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_parent_site.pth").write_text("\n".join(parents) + "\n")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check",
          "--target", str(site), str(wheel)])
    check = f"""
import importlib.metadata as md, os, torch
import {NAME} as tk
assert os.path.realpath(tk.__file__).startswith(os.path.realpath({str(site)!r})), tk.__file__
assert not torch.cuda.is_available()
assert md.version("{DIST.replace('_', '-')}") == tk.__version__ == {_version()!r}
print("version", tk.__version__)
text = tk.info()
print(text)
qkv = torch.randn(1, 1 + 2 * 3, 3 * 2 * 8)
out, cls_out = tk.spatial_attention(qkv, 3, 2)
assert out.shape == (1, 6, 16) and cls_out.shape == (1, 3, 16)
"""
    env = _env(CUDA_VISIBLE_DEVICES="")
    res = _run([str(py), "-c", check], env=env, cwd=tmp_path)
    assert f"version {_version()}" in res.stdout
    for line in ("timesformer_kernels " + _version(), "cuda extension: not built", "devices: cpu",
                 "backend torch: usable", "auto picks on cpu"):
        assert line in res.stdout, f"info() lacks {line!r}:\n{res.stdout}"
    cli = _run([str(py), "-m", NAME], env=env, cwd=tmp_path)
    assert cli.stdout.startswith(f"timesformer_kernels {_version()}"), cli.stdout
