"""Packaging: declared dependencies, the conda environment files and the test extra's pins agree.

These read pyproject.toml and the environment files; no install, no network.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import sys

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "obdask")

# Import name -> distribution name, where they differ.
IMPORT_TO_DIST = {"yaml": "pyyaml", "pynvml": "nvidia-ml-py"}
# conda-forge name -> PyPI name, where they differ.
CONDA_TO_PYPI = {"ollama-python": "ollama", "msgpack-python": "msgpack"}
# Imported by the package without being declared, each for a reason.
UNDECLARED_IMPORTS = {
    "tornado": "distributed's event loop; always installed with distributed",
    "pydantic": "the ollama client's reply types (obdask[llm] -> ollama -> pydantic)",
}
# Declared but never imported by the package, each for a reason.
UNIMPORTED_DEPENDENCIES = {
    "bokeh": "distributed's dashboard (obdask[dashboard])",
    "s3fs": "fsspec's s3:// implementation, loaded by fsspec by protocol (obdask[s3])",
}
# Non-Python packages the environments carry besides the Python dependencies.
CONDA_ONLY = {"python", "pip", "git"}


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(extra_or_core: str) -> dict[str, Requirement]:
    """Requirements of the core (``""``) or an extra, self-references expanded."""
    project = _pyproject()["project"]
    raw = (project["dependencies"] if not extra_or_core
           else project["optional-dependencies"][extra_or_core])
    out: dict[str, Requirement] = {}
    for line in raw:
        req = Requirement(line)
        if _name(req.name) == "obdask":
            for extra in sorted(req.extras):
                out.update(_requirements(extra))
        else:
            out[_name(req.name)] = req
    return out


def _runtime() -> dict[str, Requirement]:
    return {**_requirements(""), **_requirements("complete")}


def _conda(path: str) -> dict[str, SpecifierSet]:
    with open(os.path.join(ROOT, path)) as f:
        env = yaml.safe_load(f)
    assert env["channels"] == ["conda-forge"]
    out: dict[str, SpecifierSet] = {}
    for dep in env["dependencies"]:
        assert isinstance(dep, str), f"{path}: {dep!r} (a pip: section?)"
        name, spec = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", dep).groups()
        name = CONDA_TO_PYPI.get(_name(name), _name(name))
        assert name not in out, f"{path}: {name} twice"
        out[name] = SpecifierSet(spec)
    return out


def _package_imports() -> set[str]:
    """Top-level names of every absolute import in the package."""
    names: set[str] = set()
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                with open(os.path.join(folder, file)) as f:
                    tree = ast.parse(f.read(), file)
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        names.update(a.name.split(".")[0] for a in node.names)
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        names.add(node.module.split(".")[0])
    return names


def test_every_import_is_declared_and_every_dependency_used():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    third_party = {IMPORT_TO_DIST.get(n, _name(n))
                   for n in _package_imports() - stdlib - {"obdask"}}
    declared = set(_runtime())
    assert third_party - declared - set(UNDECLARED_IMPORTS) == set()
    assert declared - third_party - set(UNIMPORTED_DEPENDENCIES) == set()
    # The exceptions stay true: an entry that no longer applies is removed.
    assert set(UNDECLARED_IMPORTS) <= third_party
    assert set(UNIMPORTED_DEPENDENCIES) <= declared


def test_runtime_environment_matches_pyproject():
    conda = _conda("environment.yml")
    runtime = {n: r.specifier for n, r in _runtime().items()}
    assert {n: s for n, s in conda.items() if n not in CONDA_ONLY} == runtime
    assert CONDA_ONLY <= set(conda)
    # No test tools in the runtime environment.
    assert not set(conda) & set(_requirements("test")) - set(runtime)


def test_test_environment_matches_pyproject():
    conda = _conda("environment-test.yml")
    expected = {n: r.specifier for n, r in {**_runtime(), **_requirements("test")}.items()}
    assert {n: s for n, s in conda.items() if n not in CONDA_ONLY} == expected
    assert CONDA_ONLY <= set(conda)


def test_test_extra_uses_the_narrow_moto_extra():
    """moto[server] pulls the backends of every AWS service (cfn-lint, sympy, docker, ...)."""
    moto = _requirements("test")["moto"]
    assert moto.extras == {"s3"}
    # ... plus what moto.server.ThreadedMotoServer imports.
    assert {"flask", "flask-cors"} <= set(_requirements("test"))


def _bounds(spec: SpecifierSet) -> tuple[Version, Version]:
    lower = [Version(s.version) for s in spec if s.operator == ">="]
    upper = [Version(s.version) for s in spec if s.operator == "<"]
    assert len(lower) == 1 and len(upper) == 1, f"{spec}: want exactly >=A,<B"
    return lower[0], upper[0]


def test_boto3_pin_lies_inside_the_botocore_window_of_the_pinned_aiobotocore():
    """Every boto3 X.Y.Z needs botocore>=X.Y.Z, and aiobotocore pins botocore to a few patch
    releases: a boto3 range outside that window makes pip backtrack through boto3's releases
    (9.5 minutes measured). Bump the aiobotocore and boto3 pins in pyproject.toml together."""
    test = _requirements("test")
    try:
        installed = Version(importlib.metadata.version("aiobotocore"))
        requires = importlib.metadata.requires("aiobotocore") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("aiobotocore is not installed")
    assert installed in test["aiobotocore"].specifier, (
        f"aiobotocore {installed} is installed, pyproject pins {test['aiobotocore']}: "
        f"reinstall with pip install -e '.[test]'")
    botocore = next(Requirement(r) for r in requires
                    if _name(Requirement(r).name) == "botocore" and not Requirement(r).marker)
    boto_low, boto_high = _bounds(test["boto3"].specifier)
    core_low, core_high = _bounds(botocore.specifier)
    assert core_low <= boto_low and boto_high <= core_high, (
        f"boto3{test['boto3'].specifier} is not inside aiobotocore {installed}'s "
        f"botocore{botocore.specifier}")

