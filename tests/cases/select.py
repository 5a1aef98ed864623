"""Shared by the unit and integration tests of one topic: selection_sampler, built, ds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from croupier.format.sidecar import Sidecar
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler


@pytest.fixture(scope="module")
def built(tmp_path_factory, build_dataset) -> Path:
    return build_dataset(tmp_path_factory.mktemp("selds"))


@pytest.fixture()
def ds(built: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ds"
    shutil.copytree(built, dst)
    return dst


def selection_sampler(ds: Path, name: str, policy: PolicyConfig, batch: int = 16) -> Sampler:
    return Sampler(Sidecar.open(ds).layout(selection=name), policy, batch, seed=0)
