"""The install is layered: the core is what pcmodel imports, and each tool's dependencies are an extra.

The import checks run in a fresh interpreter, so nothing the test session already imported can hide
an import; the heavy packages are also blocked there, so a late (lazy) import fails as it would
after the quick-start install (`.[serve]`, no training packages)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from fnmatch import fnmatch
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# numba is core (issue 20): the default install and the image run the paper's network compiled.
CORE = {"torch", "numpy", "safetensors", "pillow", "onnx", "onnxruntime", "numba"}
NOT_IN_PCMODEL = ("bentoml", "matplotlib", "sklearn", "skimage", "scipy", "rich")


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name.lower() for r in requirements}


def test_pcmodel_and_pc_encode_need_no_service_or_training_packages(tmp_path):
    result = run_python(
        f"""
        import sys
        blocked = {NOT_IN_PCMODEL!r}
        for name in blocked:
            sys.modules[name] = None  # importing it now raises ImportError

        import pcmodel
        import pcmodel.cli

        assert pcmodel.cli.main(["--steps", "2", "--out", "encoded"]) == 0  # no image: the bundled photo
        print(sorted(name for name in blocked if sys.modules.get(name) is not None))
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert {p.name for p in (tmp_path / "encoded").iterdir()} == {
        "input.png", "reconstruction.png", "error.png", "montage.png", "encoding.npz"
    }  # fmt: skip


def test_the_sample_photo_is_bundled():
    from pcmodel.images import sample_photo

    photo = sample_photo()
    assert photo.shape == (256, 256, 3) and photo.dtype.name == "uint8"
    assert 50 < photo.mean() < 200 and photo.std() > 30  # a photograph, not a blank


def test_service_client_needs_only_httpx_numpy_and_pillow(tmp_path):
    result = run_python(
        """
        import sys
        for name in ("torch", "bentoml", "pcmodel"):
            sys.modules[name] = None

        from service.client import EncoderClient

        print(sorted(name for name in ("torch", "bentoml", "pcmodel") if sys.modules.get(name) is not None))
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_core_dependencies_are_the_light_set():
    assert names(PYPROJECT["project"]["dependencies"]) == CORE, "a new core dependency belongs in an extra"
    torch = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == "torch")
    assert str(torch.specifier) == "<3,>=2.3"


def test_extras_exist_and_test_takes_the_others():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"serve", "train", "bench", "fast", "pcx", "encode", "ray", "test"} <= set(extras)
    assert {"bentoml", "prometheus-client", "python-multipart", "httpx"} <= names(extras["serve"])
    assert {"scipy", "scikit-image", "scikit-learn", "matplotlib", "rich"} <= names(extras["train"])
    assert {"httpx", "psutil", "jax"} <= names(extras["bench"])
    assert not CORE & (names(extras["serve"]) | names(extras["train"]))
    (self_reference,) = [Requirement(r) for r in extras["test"] if Requirement(r).name == "predictive-coding"]
    assert self_reference.extras == {"serve", "train", "bench", "encode", "ray"}
    assert extras["fast"] == []  # kept so that old install commands work: numba is core
    assert {"pyarrow", "rich"} <= names(extras["encode"]) and "ray" in names(extras["ray"])
    assert not CORE & {"pyarrow", "ray"}  # heavy: extras only
    assert {"pytest", "ruff"} <= names(extras["test"])


def test_the_bento_lists_the_serve_extra():
    """BentoML reads no extras: [tool.bentoml.build.python].packages repeats the serve extra."""
    packages = PYPROJECT["tool"]["bentoml"]["build"]["python"]["packages"]
    serve = PYPROJECT["project"]["optional-dependencies"]["serve"]
    assert {str(Requirement(p)) for p in packages} == {str(Requirement(r)) for r in serve}


def test_every_package_is_installed():
    """Every folder with an __init__.py under the installed packages is listed (a wheel leaves out the rest)."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("pcmodel", "service", "training", "benchmarks")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found == listed
    include = PYPROJECT["tool"]["bentoml"]["build"]["include"]
    for package in found - {"training", "benchmarks"}:  # the bento serves; it needs no tools
        module = f"{package.replace('.', '/')}/module.py"
        assert any(fnmatch(module, pattern) for pattern in include), package


def test_the_service_pages_are_shipped():
    """The explorer page's files (service/static) go into the wheel and the bento, like the weights."""
    static = sorted(p.relative_to(ROOT / "service").as_posix() for p in (ROOT / "service" / "static").iterdir())
    assert {"static/index.html", "static/explorer.js", "static/explorer.css"} <= set(static)
    package_data = PYPROJECT["tool"]["setuptools"]["package-data"]["service"]
    include = PYPROJECT["tool"]["bentoml"]["build"]["include"]
    for name in static:
        assert any(fnmatch(name, pattern) for pattern in package_data), name
        assert any(fnmatch(f"service/{name}", pattern) for pattern in include), name
