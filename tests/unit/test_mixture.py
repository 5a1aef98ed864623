"""Mixtures: per-batch and long-run shares, the clip inside every source, golden vectors, resume,
online source changes, exhaustion, the mixture of one, and bad mixture files."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from croupier.errors import ConfigError, DatasetError, EndOfData, FingerprintMismatch
from croupier.layout import ClusterLayout
from croupier.mixture import open_mix, parse_mix
from croupier.server.durability.checkpoint_store import CheckpointStore
from croupier.server.job.job import Job
from croupier.server.sampling.mix_sampler import MixSampler, allocate
from croupier.server.sampling.mixture import mixture_sampler
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from croupier.server.sampling.state import Change, SamplerState
from jobs import batch
from tests.roundtrip import assert_resume_exact

THREE = """
[sources.web]
cluster_sizes = [50, 30, 20, 5]
weight = 3.0
policy = "clusterclip"
clip = 2

[sources.code]
cluster_sizes = [40, 40, 7]
weight = 1
policy = "uniform"

[sources.books]
cluster_sizes = [10, 10, 10]
block_size = 4
weight = 1.5
policy = "random"
epochs = 3

[sources.math]
cluster_sizes = [12, 9]
weight = 0.5
policy = "weighted"
cluster_weights = [1.0, 3.0]
clip = 3
"""

# Golden vectors of the 4-source mix above (B = 16, seed 7): sha256 of the first 30 batches'
# little-endian int64 ids, and the first batch itself. Moving them is a breaking change.
GOLDEN_SHA = "aec2d5a1ac6e694339d3999fec9afde3"
GOLDEN_FIRST = [95, 78, 67, 205, 171, 225, 63, 195, 121, 18, 82, 212, 100, 104, 129, 200]


@pytest.fixture
def closing() -> Iterator[ExitStack]:
    """Jobs a test opens on a state directory, closed when the test ends, passed or failed."""
    with ExitStack() as stack:
        yield stack


def mix_of(text: str, b: int = 16, seed: int = 7):
    return mixture_sampler(open_mix(parse_mix(text)), b, seed)


def source_of(ids: np.ndarray, sampler: MixSampler) -> np.ndarray:
    starts = np.array([s.id_offset for s in sampler.sources])
    return np.searchsorted(starts, ids, side="right") - 1


def test_allocation_is_within_one_per_batch_and_exact_in_the_long_run() -> None:
    rng = np.random.default_rng(0)
    for trial in range(20):
        s = int(rng.integers(2, 12))
        w = rng.random(s) * rng.choice([1, 10, 1000], size=s)
        w[rng.random(s) < 0.2] = 0.0
        if not (w > 0).any():
            w[0] = 1.0
        b = int(rng.integers(1, 300))
        p = w / w.sum()
        eligible = w > 0
        deficit = np.zeros(s)
        dealt = np.zeros(s)
        for t in range(1, 400):
            counts, deficit = allocate(w, eligible, b, deficit)
            assert counts.sum() == b
            assert (np.abs(counts - p * b) < 1.0 + 1e-9).all(), (trial, t, counts, p * b)
            dealt += counts
            assert (np.abs(dealt - p * b * t) < 1.0 + 1e-6).all(), (trial, t)
            assert (counts[~eligible] == 0).all()


def test_per_batch_shares_and_long_run_shares_through_the_engine() -> None:
    text = """
[sources.a]
cluster_sizes = [300, 200, 100]
weight = 5
policy = "uniform"
[sources.b]
cluster_sizes = [1000]
weight = 2
policy = "random"
[sources.c]
cluster_sizes = [10, 20, 30, 40]
weight = 0.7
policy = "uniform"
"""
    b = 37
    sampler = mix_of(text, b)
    p = np.array([5, 2, 0.7]) / 7.7
    dealt = np.zeros(3)
    for t in range(1, 301):
        counts = np.bincount(source_of(sampler.next_batch(), sampler), minlength=3)
        assert (np.abs(counts - p * b) < 1.0 + 1e-9).all(), (t, counts)
        dealt += counts
        assert (np.abs(dealt - p * b * t) < 1.0 + 1e-6).all()
    assert np.array_equal(sampler.source_counters().draws, dealt.astype(np.int64))


def test_the_clip_binds_per_sample_inside_every_source_and_shares_move_when_one_runs_dry() -> None:
    sampler = mix_of(THREE)
    seen: list[np.ndarray] = []
    try:
        for _ in range(200):
            seen.append(sampler.next_batch())
    except EndOfData:
        pass
    ids = np.concatenate(seen)
    counts = np.bincount(ids)
    web, code, books, math = (range(s.id_offset, s.id_offset + s.layout.num_samples) for s in sampler.sources)
    assert counts[list(web)].max() <= 2
    assert counts[list(math)].max() <= 3
    assert counts[list(books)].max() <= 3  # epochs = 3
    sc = sampler.source_counters()
    assert sc.draws[0] == 2 * 105 and sc.draws[3] == 3 * 21 and sc.draws[2] == 3 * 30  # used up exactly
    assert (sc.exhausted_at[[0, 2, 3]] >= 0).all() and sc.exhausted_at[1] == -1
    # After the others ran dry, every slot goes to the only source left.
    assert np.all(source_of(seen[-1], sampler) == 1)
    assert len(seen) == 200 and all(len(x) == 16 for x in seen)


def test_on_source_exhausted_stop_ends_the_job_at_the_first_dry_source() -> None:
    sampler = mix_of('on_source_exhausted = "stop"\n' + THREE)
    steps = 0
    with pytest.raises(EndOfData) as err:
        for _ in range(200):
            sampler.next_batch()
            steps += 1
    assert "on_source_exhausted=stop" in str(err.value) and err.value.step == steps
    before = sampler.state().to_bytes()
    with pytest.raises(EndOfData):
        sampler.next_batch()
    assert sampler.state().to_bytes() == before  # EndOfData leaves the state unchanged


def test_golden_vectors_and_determinism() -> None:
    a, b = mix_of(THREE), mix_of(THREE)
    h = hashlib.sha256()
    first = None
    for _ in range(30):
        x, y = a.next_batch(), b.next_batch()
        assert np.array_equal(x, y)
        h.update(x.astype("<i8").tobytes())
        if first is None:
            first = x.tolist()
    assert first == GOLDEN_FIRST
    assert h.hexdigest()[:32] == GOLDEN_SHA
    assert not np.array_equal(mix_of(THREE, seed=8).next_batch(), mix_of(THREE).next_batch())


def test_resume_is_exact_at_every_point() -> None:
    for k in (0, 1, 5, 13, 22):
        assert_resume_exact(lambda: mix_of(THREE), lambda s: s.next_batch(),
                            lambda s: s.state().to_bytes(),
                            lambda s, saved: s.load_state(SamplerState.from_bytes(saved)), k, 6)


def test_a_mixture_of_one_is_the_single_dataset_job() -> None:
    text = '[sources.only]\ncluster_sizes = [500, 30, 2]\nweight = 2.5\npolicy = "clusterclip"\nclip = 3\n'
    mix = open_mix(parse_mix(text))
    got = mixture_sampler(mix, 32, 5)
    want = Sampler(ClusterLayout.from_sizes([500, 30, 2]), PolicyConfig("clusterclip", clip=3), 32, 5)
    assert isinstance(got, Sampler) and got.fingerprint == want.fingerprint
    for _ in range(40):
        assert np.array_equal(got.next_batch(), want.next_batch())


def test_online_source_changes_apply_at_their_step_and_replay_from_the_event_log(tmp_path: Path,
                                                                                    closing: ExitStack) -> None:
    mix = open_mix(parse_mix(THREE))
    job = closing.enter_context(Job(None, None, 16, 7, store=CheckpointStore(tmp_path / "state"), mixture=mix))
    ref = mixture_sampler(mix, 16, 7)
    ref.schedule_change(Change(step=4, source=1, source_weight=0.0))
    job.update(4, source="code", source_weight=0.0)
    job.update(6, clip=3, source="web")
    ref.schedule_change(Change(step=6, source=0, clip=3))
    batches = [batch(job, t) for t in range(12)]  # generation under the job's own rules
    expect = [ref.next_batch() for _ in range(12)]
    for t in range(12):
        assert np.array_equal(batches[t], expect[t]), t
    assert not (source_of(expect[5], ref) == 1).any()  # code is paused from step 4
    job.close()
    # A new job over the same state directory replays every step from its checkpoints and events.
    again = closing.enter_context(Job(None, None, 16, 7, store=CheckpointStore(tmp_path / "state"), mixture=mix))
    for t in range(12):
        assert np.array_equal(batch(again, t), expect[t]), t
    with pytest.raises(ConfigError, match="unknown source 'nope'"):
        Job(None, None, 16, 7, mixture=mix).update(20, source="nope", source_weight=1.0)
    with pytest.raises(ConfigError, match="at least one source weight"):
        ref.schedule_change(Change(step=30, source_weights=(0.0, 0.0, 0.0, 0.0)))
    with pytest.raises(ConfigError, match="policy 'uniform', which takes no clip"):
        ref.schedule_change(Change(step=30, source=1, clip=2))


def test_bad_mixture_files_are_refused_by_name(tmp_path: Path, build_dataset) -> None:
    ok = '[sources.a]\ncluster_sizes = [5]\nweight = 1\npolicy = "uniform"\n'
    cases = {
        'colour = "red"\n' + ok: "unknown top-level keys ['colour']",
        '[sources.a]\ncluster_sizes = [5]\nweight = 1\npolicy = "uniform"\nshuffle = true\n':
            "source 'a': unknown keys ['shuffle']",
        '[sources.a]\ncluster_sizes = [5]\nweight = -1\npolicy = "uniform"\n': "weight must be a finite number >= 0, got -1",
        '[sources.a]\ncluster_sizes = [5]\nweight = nan\npolicy = "uniform"\n': "got nan",
        '[sources.a]\ncluster_sizes = [5]\nweight = inf\npolicy = "uniform"\n': "got inf",
        '[sources.a]\ncluster_sizes = [5]\nweight = 0\npolicy = "uniform"\n'
        '[sources.b]\ncluster_sizes = [5]\nweight = 0.0\npolicy = "uniform"\n': "all are zero",
        ok + ok: "not valid TOML",
        '[sources.a]\ncluster_sizes = [5]\nweight = 1\npolicy = "g2s"\n': "policy must be one of",
        '[sources.a]\ncluster_sizes = [5]\nweight = 1\npolicy = "clusterclip"\n': "needs clip",
        '[sources.a]\ncluster_sizes = [5]\nweight = 1\npolicy = "clusterclip"\nclip = "auto"\n': "needs budget_steps",
        '[sources.a]\nweight = 1\npolicy = "uniform"\n': "exactly one of dataset",
        'unit = "bytes"\n' + ok: "unit must be one of",
        '[sources]\n': "declares no sources",
    }
    for text, msg in cases.items():
        with pytest.raises(ConfigError) as err:
            parse_mix(text, "m.toml")
        assert msg in str(err.value), (text, str(err.value))
    with pytest.raises(ConfigError, match="cluster_weights has 1 entries but the source has 2 clusters"):
        open_mix(parse_mix('[sources.a]\ncluster_sizes = [5, 6]\nweight = 1\npolicy = "weighted"\n'
                           'cluster_weights = [1.0]\n'))
    with pytest.raises(ConfigError, match="synthetic source has none"):
        open_mix(parse_mix('unit = "tokens"\n' + ok))
    # Datasets: missing, a sidecar that does not match its shards, an unknown selection.
    missing = f'[sources.gone]\ndataset = "{tmp_path / "nowhere"}"\nweight = 1\npolicy = "uniform"\n'
    with pytest.raises(DatasetError, match="mixture source 'gone'.*does not exist"):
        open_mix(parse_mix(missing))
    ds = build_dataset(tmp_path / "one", num_docs=120, topics=3)
    sel = f'[sources.s]\ndataset = "{ds}"\nweight = 1\npolicy = "uniform"\nselection = "best"\n'
    with pytest.raises(ConfigError, match="mixture source 's'.*best"):
        open_mix(parse_mix(sel))
    index = ds / "index.json"
    obj = json.loads(index.read_text())
    obj["shards"][0]["samples"] = obj["shards"][0]["samples"]  # same content, other bytes
    index.write_text(json.dumps(obj, indent=1))
    with pytest.raises(FingerprintMismatch, match="mixture source 's'"):
        open_mix(parse_mix(sel.replace('selection = "best"\n', "")))


def test_simulate_and_update_flags(tmp_path: Path, capsys) -> None:
    from croupier.cli import main

    f = tmp_path / "m.toml"
    f.write_text(THREE)
    run = ["simulate", "--mix", str(f), "--global-batch", "16", "--seed", "7"]
    assert main(run + ["--steps", "3", "--format", "jsonl"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    ref = mix_of(THREE)
    assert len(lines) == 3 and [x["indices"] for x in lines] == [ref.next_batch().tolist() for _ in range(3)]
    assert main(run + ["--steps", "100"]) == 0
    out = capsys.readouterr().out
    assert "source 'web' ran out of room at step" in out and "mixture of 4 sources" in out
    assert main(run + ["--steps", "3", "--policy", "uniform"]) == 2
    assert "remove --policy" in capsys.readouterr().err


def test_status_and_metrics_show_the_sources(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from croupier.server.serving.metrics import ServerMetrics
    from croupier.server.serving.service import job_info

    job = Job(None, None, 16, 7, mixture=open_mix(parse_mix(THREE)))
    for t in range(40):
        batch(job, t)
    st = job.status()
    assert st.sources is not None and st.sources.names == ("web", "code", "books", "math")
    info = job_info(job)
    assert [s.name for s in info.sources] == ["web", "code", "books", "math"] and info.policy == "mixture"
    assert [s.offset for s in info.sources] == [0, 105, 192, 222] and info.sources[0].exhausted_at >= 0
    assert sum(s.draws for s in info.sources) == 40 * 16
    text = generate_latest(ServerMetrics(job).registry).decode()
    assert 'croupier_source_draws_total{source="web"} 210.0' in text
    assert 'croupier_source_exhausted{source="web"} 1.0' in text and 'croupier_source_exhausted{source="code"} 0.0' in text
    job.close()


def test_token_weighted_shares_follow_the_mean_tokens_per_sample(tmp_path: Path, build_dataset,
                                                                 tiny_tokenizer) -> None:
    from croupier.cli import main
    from croupier.format.sidecar import Sidecar

    short = build_dataset(tmp_path / "short", num_docs=120, topics=3)
    long = build_dataset(tmp_path / "long", num_docs=80, topics=2)
    text = (f'unit = "tokens"\n[sources.short]\ndataset = "{short}"\nweight = 1\npolicy = "uniform"\n'
            f'[sources.long]\ndataset = "{long}"\nweight = 1\npolicy = "uniform"\n')
    with pytest.raises(ConfigError, match="source 'short'.*needs per-sample token counts"):
        open_mix(parse_mix(text))
    for ds in (short, long):
        assert main(["shards", "tokens", str(ds), "--tokenizer", str(tiny_tokenizer), "--quiet"]) == 0
    mix = open_mix(parse_mix(text))
    means = [float(np.asarray(Sidecar.open(d).token_counts()).mean()) for d in (short, long)]
    assert mix.sample_weights == pytest.approx((1 / means[0], 1 / means[1]))
    # Equal token weights: the sources' expected token shares are equal.
    sampler = mixture_sampler(mix, 64, 0)
    counts = np.concatenate([np.asarray(Sidecar.open(short).token_counts()),
                             np.asarray(Sidecar.open(long).token_counts())]).astype(np.int64)
    ids = np.concatenate([sampler.next_batch() for _ in range(300)])
    src = source_of(ids, sampler)
    tok = np.bincount(src, weights=counts[ids], minlength=2)
    assert abs(tok[0] / tok.sum() - 0.5) < 0.03, tok
