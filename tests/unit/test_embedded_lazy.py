"""Embedded dealing over a mixture opens each source's sidecar by its manifest alone; the
check of a source's shards is the shard store's, when the source is first read. A rewritten
index is still refused by fingerprint (then, naming the dataset), and a server-side load
still refuses it at once."""

from __future__ import annotations

import json
import shutil

import pytest

from croupier.client.dataset import CroupierIterableDataset
from croupier.errors import DatasetError, FingerprintMismatch
from croupier.format.sidecar import Sidecar
from croupier.mixture import load_mix
from croupier.topology import Topology


def _mix(tmp_path, a, b):
    mix = tmp_path / "mix.toml"
    mix.write_text(f'[sources.a]\ndataset = "{a}"\nweight = 1\npolicy = "uniform"\n'
                   f'[sources.b]\ndataset = "{b}"\nweight = 1\npolicy = "uniform"\n')
    return mix


def test_a_deferred_mixture_refuses_other_shards_when_the_source_is_read(build_dataset, tmp_path):
    a = build_dataset(tmp_path / "a")
    b = build_dataset(tmp_path / "b")
    fingerprint = Sidecar.open(b).fingerprint
    mix = _mix(tmp_path, a, b)
    checked = load_mix(mix, tmp_path / "cache")
    deferred = load_mix(mix, tmp_path / "cache", deferred=True)
    assert [(i.name, i.fingerprint, i.offset, i.size) for i in deferred.infos] == \
        [(i.name, i.fingerprint, i.offset, i.size) for i in checked.infos]
    for x, y in zip(deferred.layouts, checked.layouts):
        assert x.fingerprint == y.fingerprint and (x.offsets == y.offsets).all()

    index = json.loads((b / "index.json").read_text())
    (b / "index.json").write_text(json.dumps(index, indent=3))  # the same shards' index, other bytes
    with pytest.raises(FingerprintMismatch, match="^mixture source 'b': sidecar fingerprint mismatch"):
        load_mix(mix, tmp_path / "cache")  # what a server does: every source checked at start
    opened = load_mix(mix, tmp_path / "cache", deferred=True)
    assert opened.infos[1].fingerprint == fingerprint  # the manifest's, unchecked so far
    ds = CroupierIterableDataset.embedded(mix=mix, global_batch=16, cache_dir=tmp_path / "shards",
                                          topology=Topology(0, 1), steps=2)
    with pytest.raises(FingerprintMismatch, match=f"fingerprint mismatch: expected {fingerprint}"):
        list(ds)


def test_a_deferred_open_without_a_manifest_says_what_is_missing(build_dataset, tmp_path):
    d = build_dataset(tmp_path)
    assert Sidecar.open_deferred(d).manifest == Sidecar.open(d).manifest
    shutil.rmtree(d / "croupier")
    with pytest.raises(DatasetError, match="has no cluster sidecar"):
        Sidecar.open_deferred(d)
    with pytest.raises(DatasetError, match="does not exist"):
        Sidecar.open_deferred(tmp_path / "nowhere")
