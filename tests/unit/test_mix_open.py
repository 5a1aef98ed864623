"""A mixture's local sidecars are opened in the calling thread (faster than handing each to a
pool), and the first failing source in file order is the one named."""

from __future__ import annotations

import concurrent.futures

import pytest

from croupier.errors import DatasetError
from croupier.mixture import load_mix


def test_local_sources_open_in_order_without_threads(build_dataset, tmp_path, monkeypatch):
    good = build_dataset(tmp_path / "a")

    def no_pool(*args, **kwargs):
        raise AssertionError("local sidecars need no thread pool")

    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", no_pool)
    mix = tmp_path / "mix.toml"
    mix.write_text(f'[sources.a]\ndataset = "{good}"\nweight = 1\npolicy = "uniform"\n'
                   f'[sources.b]\ndataset = "{good}"\nweight = 2\npolicy = "uniform"\n')
    mixture = load_mix(mix, tmp_path / "cache")
    assert [i.name for i in mixture.infos] == ["a", "b"]
    assert mixture.infos[1].offset == mixture.infos[0].size and mixture.token_counts == (None, None)
    (tmp_path / "empty").mkdir()
    mix.write_text(f'[sources.a]\ndataset = "{good}"\nweight = 1\npolicy = "uniform"\n'
                   f'[sources.b]\ndataset = "{tmp_path / "empty"}"\nweight = 1\npolicy = "uniform"\n'
                   f'[sources.c]\ndataset = "{tmp_path / "missing"}"\nweight = 1\npolicy = "uniform"\n')
    with pytest.raises(DatasetError, match="^mixture source 'b': .* holds no MDS index.json"):
        load_mix(mix, tmp_path / "cache")
