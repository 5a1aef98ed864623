"""Token-exact mixtures: a `unit = "tokens"` mixture dealt in tokens gives every source floor or
ceil of its share of G(t) tokens every step (the rule: exact to the token, documents split at
the cut), every step holds exactly G tokens, the ranks' parts partition it, each source's pieces
concatenate to its own document stream (nothing lost or repeated), a token budget stops a
source at exactly N tokens, the state resumes at the token, and bad configs are refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from croupier.errors import ConfigError, EndOfData, FingerprintMismatch
from croupier.layout import ClusterLayout
from croupier.mixture import Mixture, SourceInfo, parse_mix
from croupier.server.sampling.mix_sampler import MixSampler
from croupier.server.sampling.mixture import mixture_sampler
from croupier.server.sampling.sampler import Sampler
from croupier.server.sampling.state import SamplerState
from croupier.server.sampling.token_mixture import MixTokenStep, TokenMixDealer, TokenUnitMix, source_seed
from croupier.server.sampling.token_stream import TokenDealer, TokenSchedule

SCHEDULE = "0:1000,60:1536,140:2024"  # every G divisible by 8 ranks
SEED = 4
CHUNK = 24


def mix_text(unit: str = "tokens", budget: str = "", on_ex: str = "redistribute", extra: str = "") -> str:
    return (f'unit = "{unit}"\non_source_exhausted = "{on_ex}"\n'
            '[sources.web]\ncluster_sizes = [300, 120, 40, 9]\nweight = 4\npolicy = "uniform"\n'
            f'[sources.code]\ncluster_sizes = [200, 50]\nweight = 3.3\npolicy = "clusterclip"\nclip = 40\n{budget}'
            f'[sources.books]\ncluster_sizes = [150]\nweight = 1.7\npolicy = "random"\n{extra}')


def mixture(text: str) -> Mixture:
    """The Mixture `open_mix` would give, with per-sample token counts for the synthetic sources."""
    spec = parse_mix(text)
    rng = np.random.default_rng(11)
    layouts, infos, weights, counts = [], [], [], []
    offset = 0
    for i, d in enumerate(spec.sources):
        assert d.cluster_sizes is not None
        layout = ClusterLayout.from_sizes(d.cluster_sizes)
        c = rng.integers(0, 50 * (i + 1), layout.num_samples)
        infos.append(SourceInfo(name=d.name, remote="", fingerprint="", offset=offset, size=layout.num_samples,
                                selection="", num_clusters=layout.num_clusters, weight=d.weight, policy=d.policy))
        layouts.append(layout)
        counts.append(c)
        weights.append(d.weight / float(c.mean()) if spec.unit == "tokens" else d.weight)
        offset += layout.num_samples
    return Mixture(spec=spec, layouts=tuple(layouts), infos=tuple(infos), sample_weights=tuple(weights),
                   token_counts=tuple(counts))


def dealer(text: str | None = None, schedule: str = SCHEDULE) -> TokenDealer:
    mix = mixture(text or mix_text())
    pieces = mix.token_counts_by_offset()
    assert pieces is not None
    return TokenDealer(lambda: mixture_sampler(mix, CHUNK, SEED), pieces, TokenSchedule.parse(schedule), CHUNK)


def tokens_of(st: MixTokenStep) -> list[tuple[int, int]]:
    """(document, stream token index) of every token of a step, in its order."""
    return [(doc, i) for doc, a, b in zip(st.ids.tolist(), st.starts.tolist(), st.ends.tolist()) for i in range(a, b)]


def test_every_step_holds_g_tokens_and_each_source_floor_or_ceil_of_its_share() -> None:
    d = dealer()
    assert isinstance(d, TokenMixDealer) and d.fingerprint.startswith("tokmix:")
    sched = TokenSchedule.parse(SCHEDULE)
    p = np.array([4, 3.3, 1.7]) / 9.0
    dealt = np.zeros(3)
    for t in range(200):
        st = d.next_step()
        g = sched.tokens_at(t)
        got = st.source_tokens(3)
        assert st.tokens == g and int(got.sum()) == g and len(tokens_of(st)) == g, t
        low, high = np.floor(p * g).astype(int), np.ceil(p * g).astype(int)
        assert ((got >= low) & (got <= high)).all(), (t, got, p * g)
        dealt += got
        assert np.abs(dealt - p * sched.offset(t + 1)).max() <= 1.0 + 1e-6, t  # exact in the long run too
    assert (d.exhausted_at == -1).all()
    assert d.source_tokens()[0].tolist() == dealt.astype(int).tolist()


def test_each_source_pieces_concatenate_to_its_own_document_stream() -> None:
    d = dealer()
    assert isinstance(d, TokenMixDealer)
    seen: list[list[tuple[int, int]]] = [[], [], []]
    for _ in range(120):
        st = d.next_step()
        for doc, a, b, s in zip(st.ids.tolist(), st.starts.tolist(), st.ends.tolist(), st.sources.tolist()):
            seen[s].extend((doc, i) for i in range(a, b))
    mix = mixture(mix_text())
    for i, src in enumerate(d.sources):
        docs = Sampler(src.layout, src.config, src.chunk, source_seed(SEED, i))
        want: list[tuple[int, int]] = []
        while len(want) < len(seen[i]):
            for local in docs.next_batch().tolist():
                want.extend((local + src.id_offset, j) for j in range(int(mix.token_counts[i][local]) + 1))
        assert seen[i] == want[:len(seen[i])], src.name
    # the step's pieces are riffled: ranks' parts hold several sources
    st = d.next_step()
    assert len(set(st.sources[:10].tolist())) > 1 and st.sources.tolist() != sorted(st.sources.tolist())


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_ranks_parts_partition_every_step(world: int) -> None:
    d = dealer()
    for _ in range(70):
        st = d.next_step()
        whole = tokens_of(st)
        parts: list[tuple[int, int]] = []
        for r in range(world):
            sl = st.part(r, world)
            assert sl.tokens == st.tokens // world
            parts.extend((doc, i) for doc, (a, b) in zip(sl.ids.tolist(), sl.ranges()) for i in range(a, b))
        assert parts == whole
    with pytest.raises(ConfigError, match="not divisible by the data-parallel world size 7"):
        st.part(0, 7)


def budget_text(on_ex: str = "redistribute") -> str:
    return mix_text(budget="token_budget = 23456\n", on_ex=on_ex)


def run(d: TokenDealer, steps: int) -> list[tuple]:
    out = []
    for _ in range(steps):
        st = d.next_step()
        assert isinstance(st, MixTokenStep)
        out.append((st.ids.tolist(), st.starts.tolist(), st.ends.tolist(), st.sources.tolist()))
    return out


@pytest.mark.parametrize("text", [mix_text(), budget_text()], ids=["shares", "budget"])
def test_resume_at_three_mid_points_equals_the_uninterrupted_run(text: str) -> None:
    ref = run(dealer(text), 200)
    for k in (37, 101, 163):
        d = dealer(text)
        run(d, k)
        again = dealer(text)
        again.load_state(SamplerState.from_bytes(d.state().to_bytes()))
        assert run(again, 200 - k) == ref[k:], k
    with pytest.raises(FingerprintMismatch):
        dealer(mix_text()).load_state(dealer(budget_text()).state())


def test_a_token_budget_stops_its_source_exactly_and_its_share_is_redistributed() -> None:
    d = dealer(budget_text())
    assert isinstance(d, TokenMixDealer)
    sched = TokenSchedule.parse(SCHEDULE)
    code = 0
    stop = None
    for t in range(200):
        st = d.next_step()
        got = st.source_tokens(3)
        assert int(got.sum()) == sched.tokens_at(t) == st.tokens
        code += int(got[1])
        if stop is None and code == 23456:
            stop = t
        if stop is not None and t > stop:  # after it: the other two share G by their weights, floor or ceil
            g = sched.tokens_at(t)
            p = np.array([4, 1.7]) / 5.7
            assert got[1] == 0
            assert np.floor(p * g)[0] <= got[0] <= np.ceil(p * g)[0] and np.floor(p * g)[1] <= got[2] <= np.ceil(p * g)[1]
        dealt, target = d.source_tokens()
        assert np.abs(dealt - target).max() <= 2.0 + 1e-6, t  # deficits restart when the budget ends: one more
    assert stop is not None and code == 23456
    assert d.exhausted_at.tolist() == [-1, stop, -1]
    assert d.source_tokens()[0][1] == 23456
    assert d.source_counters().exhausted_at.tolist() == [-1, stop, -1]


def test_on_source_exhausted_stop_ends_at_the_budget_and_leaves_the_state_unchanged() -> None:
    d = dealer(budget_text(on_ex="stop"))
    steps = 0
    with pytest.raises(EndOfData) as exc:
        while True:
            d.next_step()
            steps += 1
    assert "source 'code'" in str(exc.value) and "on_source_exhausted=stop" in str(exc.value)
    before = d.state().to_bytes()
    with pytest.raises(EndOfData):
        d.next_step()
    assert d.state().to_bytes() == before and d.step == steps


def test_documents_dealt_jobs_over_the_same_mixture_do_not_move() -> None:
    mix = mixture(mix_text())
    unit = mixture_sampler(mix, 32, SEED)
    assert isinstance(unit, TokenUnitMix)
    plain = MixSampler(unit.sources, 32, SEED, "redistribute")
    assert unit.fingerprint == plain.fingerprint
    for _ in range(30):
        assert unit.next_batch().tolist() == plain.next_batch().tolist()
    # a unit = "samples" mixture dealt in tokens keeps the document-share stream (kind tok:)
    assert dealer(mix_text(unit="samples")).fingerprint.startswith("tok:")


def test_the_fingerprint_names_the_kind_and_binds_budget_schedule_and_seed() -> None:
    fps = {dealer().fingerprint, dealer(budget_text()).fingerprint, dealer(schedule="0:1000").fingerprint,
           dealer(mix_text(budget="token_budget = 23457\n")).fingerprint}
    assert len(fps) == 4 and all(f.startswith("tokmix:") for f in fps)


@pytest.mark.parametrize("text, match", [
    (mix_text(unit="samples", budget="token_budget = 100\n"), "token_budget counts tokens and needs unit"),
    (mix_text(budget="token_budget = 0\n"), "token_budget must be an integer in \\[1, "),
    (mix_text(budget="token_budget = \"lots\"\n"), "token_budget must be an integer"),
    ('unit = "tokens"\n[sources.a]\ncluster_sizes = [5]\nweight = 1\npolicy = "uniform"\ntoken_budget = 9\n',
     "token_budget 9 of the only source 'a' needs a second source"),
])
def test_bad_budgets_are_refused_in_one_line(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as exc:
        parse_mix(text)
    assert "\n" not in str(exc.value)


def test_what_a_token_exact_mixture_cannot_take_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="source 'books': epochs 2 caps documents.*use token_budget") as exc:
        dealer(mix_text(extra="epochs = 2\n"))
    assert "\n" not in str(exc.value)
    mix = mixture(budget_text())
    with pytest.raises(ConfigError, match="token_budget \\(source 'code'\\).*needs steps in tokens"):
        mixture_sampler(mix, 32, SEED).next_batch()
    with pytest.raises(ConfigError, match="online changes of a token-exact mixture"):
        dealer().schedule_change(object())


def test_served_slices_carry_each_piece_span() -> None:
    from croupier.server.job.slices import cut_slice

    st = dealer().next_step()
    sl = st.part(1, 4)
    data = cut_slice(0, st, 1, 4, 1, CHUNK)
    assert data.ids.tolist() == sl.ids.tolist()
    assert [tuple(x) for x in data.spans.tolist()] == [(a, b, int(n)) for (a, b), n in zip(sl.ranges(),
                                                                                            sl.lengths.tolist())]
    assert int((data.spans[:, 1] - data.spans[:, 0]).sum()) == 250


@pytest.fixture(scope="module")
def built_mix(tmp_path_factory, build_dataset, tiny_tokenizer) -> tuple[Path, list[Path]]:
    """A mixture file of two built datasets with token counts; 'long' has a token budget."""
    from croupier.shards.build.token_counts import add_token_counts

    root = tmp_path_factory.mktemp("tokmix")
    short = build_dataset(root / "short", num_docs=120, topics=3)
    long = build_dataset(root / "long", num_docs=80, topics=2)
    for ds in (short, long):
        add_token_counts(str(ds), tokenizer=str(tiny_tokenizer), progress=False)
    mix = root / "mix.toml"
    mix.write_text(f'unit = "tokens"\n[sources.short]\ndataset = "{short}"\nweight = 3\npolicy = "uniform"\n'
                   f'[sources.long]\ndataset = "{long}"\nweight = 1\npolicy = "uniform"\ntoken_budget = 3000\n')
    return mix, [short, long]


def simulated(mix: Path, steps: int, capsys, extra: tuple[str, ...] = ()) -> list[dict]:
    from croupier.cli import main

    assert main(["simulate", "--mix", str(mix), "--global-tokens", "512", "--steps", str(steps), "--seed", "2",
                 "--format", "jsonl", *extra]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_simulate_prints_per_source_tokens_against_target(built_mix, capsys) -> None:
    from croupier.cli import main

    mix = built_mix[0]
    rows = simulated(mix, 40, capsys)
    assert len(rows) == 40 and all(r["tokens"] == 512 for r in rows)
    long_total = 0
    for r in rows:
        got, want = r["source_tokens"], r["source_targets"]
        assert sum(got.values()) == 512 and sum(b - a for a, b in r["spans"]) == 512
        long_total += got["long"]
        if long_total < 3000:
            assert all(math.floor(want[n]) <= got[n] <= math.ceil(want[n]) for n in got), r["step"]
    assert long_total == 3000
    assert main(["simulate", "--mix", str(mix), "--global-tokens", "512", "--steps", "40", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "token-exact mixture of 2 sources" in out and "3,000" in out
    assert "source 'long' ran out (its token budget)" in out
    assert main(["simulate", "--mix", str(mix), "--global-batch", "8", "--steps", "3"]) == 2
    assert "needs steps in tokens" in capsys.readouterr().err


def test_serve_refuses_a_budget_under_global_batch(built_mix, tmp_path, capsys) -> None:
    from croupier.cli import main

    assert main(["serve", "--mix", str(built_mix[0]), "--global-batch", "8", "--state-dir", str(tmp_path / "st"),
                 "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("token_budget (source 'long') stops a source at N tokens and needs steps in tokens "
                            "(--global-tokens or --token-schedule), not --global-batch"), err


def stream_tokens(rows: list[dict], datasets: list[Path], tok_path: Path, cache: Path) -> list[list[int]]:
    """Per step, the tokens of simulate's pieces (each document's tokens + EOS, cut at its span)."""
    from cases.shards_build import read_back

    texts = [r["text"] for i, ds in enumerate(datasets) for r in read_back(ds, cache / str(i))]
    tok = tokenizer(tok_path)
    out = []
    for r in rows:
        stream: list[int] = []
        for doc, (a, b) in zip(r["indices"], r["spans"]):
            stream += (tok(texts[doc], add_special_tokens=False)["input_ids"] + [EOS])[a:b]
        out.append(stream)
    return out


EOS = 102  # the WordPiece tokenizer's [SEP]


def tokenizer(path: Path):  # noqa: ANN201
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.mark.parametrize("served", [False, True], ids=["embedded", "served"])
def test_ranks_get_exactly_their_tokens_and_together_the_simulated_stream(built_mix, tmp_path, tiny_tokenizer,
                                                                          served, capsys) -> None:
    from contextlib import ExitStack

    from croupier.client.dataset import CroupierIterableDataset
    from croupier.client.packing import PackedSequences
    from croupier.topology import Topology

    mix, datasets = built_mix
    steps, world = 30, 2  # the budget of 'long' runs out inside these steps
    want = stream_tokens(simulated(mix, steps, capsys), datasets, tiny_tokenizer, tmp_path / "rb")
    with ExitStack() as stack:
        addr = served_mix_job(stack, mix, tmp_path / "side") if served else None
        per_rank = []
        for rank in range(world):
            topo = Topology(rank=rank, world=world)
            data = CroupierIterableDataset(addr, "t", cache_dir=tmp_path / "c", steps=steps, topology=topo) \
                if served else CroupierIterableDataset.embedded(mix=mix, cache_dir=tmp_path / "c", seed=2,
                                                                global_tokens=512, topology=topo, steps=steps)
            p = PackedSequences(data, seq_len=128, rows=2, tokenizer=tokenizer(tiny_tokenizer), eos_id=EOS)
            items = list(p)
            assert [int(it["_croupier_step"]) for it in items] == list(range(steps))
            assert all(tuple(it["input_ids"].shape) == (2, 128) and bool(it["loss_mask"].all()) for it in items)
            per_rank.append([it["input_ids"].flatten().tolist() for it in items])
    for t in range(steps):
        assert [x for r in range(world) for x in per_rank[r][t]] == want[t], t


def token_mix_job(mix: Path, cache: Path, store=None):  # noqa: ANN001, ANN201 - a CheckpointStore, a Job
    """The job `croupier serve --mix MIX --global-tokens 512 --seed 2` makes, in process."""
    from croupier.mixture import load_mix
    from croupier.server.job.job import Job, JobSpec
    from croupier.server.sampling.token_stream import mean_stream_tokens, plan_tokens

    m = load_mix(mix, cache)
    pieces = m.token_counts_by_offset()
    assert pieces is not None
    schedule = TokenSchedule.constant(512)
    mean = float(np.mean([mean_stream_tokens(c, lay.ids_at(np.arange(lay.num_positions)))
                          for (_, c), lay in zip(pieces, m.layouts)]))
    chunk, _ = plan_tokens(schedule, mean, None, None)
    return Job(m.layouts[0], None, chunk, 2, spec=JobSpec(name="t"), mixture=m,  # type: ignore[arg-type]
               token_counts=pieces, tokens=(schedule, pieces, chunk), store=store)


def served_mix_job(stack, mix: Path, cache: Path) -> str:
    """`croupier serve --mix MIX --global-tokens 512 --seed 2`, in process; its address."""
    from jobs import start_server

    job = token_mix_job(mix, cache)
    assert job.fingerprint.startswith("tokmix:")
    _, port = start_server(stack, job)
    return f"127.0.0.1:{port}"


def test_a_source_its_clip_exhausts_stops_mid_step_and_the_step_still_holds_g() -> None:
    d = dealer(mix_text().replace("clip = 40", "clip = 1"))
    assert isinstance(d, TokenMixDealer)
    sched = TokenSchedule.parse(SCHEDULE)
    steps = [d.next_step() for _ in range(120)]
    per_step = [st.source_tokens(3) for st in steps]
    assert all(int(got.sum()) == sched.tokens_at(t) for t, got in enumerate(per_step))
    stop = int(d.exhausted_at[1])
    assert stop > 0 and d.exhausted_at.tolist() == [-1, stop, -1]
    assert all(got[1] == 0 for got in per_step[stop + 1:]) and per_step[stop - 1][1] > 0
    # clip 1: each of its documents dealt once, whole (its pieces add up to its stream length)
    taken: dict[int, int] = {}
    length: dict[int, int] = {}
    for st in steps:
        for doc, a, b, n, s in zip(st.ids.tolist(), st.starts.tolist(), st.ends.tolist(), st.lengths.tolist(),
                                   st.sources.tolist()):
            if s == 1:
                taken[doc] = taken.get(doc, 0) + b - a
                length[doc] = n
    assert taken == length and sum(taken.values()) == d.source_tokens()[0][1]
    assert len(taken) == int(d.counters().draws[4:6].sum()) <= 250


def test_golden_vectors() -> None:
    """The dealt sequence is the contract: a change of it needs a new TOKEN_MIX_VERSION."""
    import hashlib

    d = dealer()
    assert d.fingerprint == "tokmix:122bdc40ebed0a44bfa7a738"
    h = hashlib.sha256()
    for _ in range(3):
        st = d.next_step()
        for a in (st.ids, st.starts, st.ends, st.sources):
            h.update(a.astype("<i8").tobytes())
    assert h.hexdigest()[:16] == "83684ecca957ab63"
    st = d.next_step()
    assert st.ids[:8].tolist() == [467, 449, 501, 681, 100, 441, 563, 391]
    assert st.starts[:8].tolist() == [5, 0, 23, 0, 0, 0, 0, 0]
    assert st.ends[:8].tolist() == [37, 11, 37, 45, 5, 50, 94, 41]
    assert st.sources[:8].tolist() == [0, 0, 1, 1, 0, 0, 1, 0]


def test_status_shows_each_sources_tokens_against_target(built_mix, tmp_path) -> None:
    from contextlib import ExitStack

    import grpc

    from croupier.client.cli.admin_cli import format_status
    from croupier.client.dataset import CroupierIterableDataset
    from croupier.grpc_options import channel_options
    from croupier.proto import pb2, pb2_grpc
    from croupier.topology import Topology

    mix, _ = built_mix
    with ExitStack() as stack:
        addr = served_mix_job(stack, mix, tmp_path / "side")
        data = CroupierIterableDataset(addr, "t", cache_dir=tmp_path / "c", steps=12, topology=Topology(0, 1))
        assert {s["_croupier_step"] for s in data} == set(range(12))
        data.close()
        with grpc.insecure_channel(addr, options=channel_options()) as channel:
            resp = pb2_grpc.SamplerStub(channel).GetStatus(pb2.GetStatusRequest(), timeout=10)
    job = resp.job
    assert job.policy == "mixture" and [s.name for s in job.sources] == ["short", "long"]
    generated = resp.generated_step
    assert generated >= 12
    dealt = [s.tokens_dealt for s in job.sources]
    target = [s.tokens_target for s in job.sources]
    assert sum(dealt) == generated * 512 and sum(target) == generated * 512
    assert all(abs(d - t) <= 1 for d, t in zip(dealt, target))
    assert dealt[0] > 2 * dealt[1]  # weights 3 : 1
    table = format_status(resp)
    assert "tokens dealt" in table and f"{dealt[0]:,}" in table


def test_a_samples_unit_mixture_dealt_in_tokens_names_its_policy_and_tallies_by_source(built_mix, tmp_path) -> None:
    from contextlib import ExitStack

    from croupier.client.dataset import CroupierIterableDataset
    from croupier.topology import Topology

    _, (short, long) = built_mix
    mix = tmp_path / "samples.toml"
    mix.write_text(f'[sources.short]\ndataset = "{short}"\nweight = 3\npolicy = "uniform"\n'
                   f'[sources.long]\ndataset = "{long}"\nweight = 1\npolicy = "uniform"\n')
    with ExitStack() as stack:
        from croupier.mixture import load_mix
        from jobs import start_server

        m = load_mix(mix, tmp_path / "side")
        job = token_mix_job(mix, tmp_path / "side")
        assert job.fingerprint.startswith("tok:") and job.policy_name == "mixture"
        _, port = start_server(stack, job)
        data = CroupierIterableDataset(f"127.0.0.1:{port}", "t", cache_dir=tmp_path / "c", steps=6,
                                       topology=Topology(0, 1))
        ids = sorted({int(s["_croupier_id"]) for s in data})
        data.close()
        st = job.status()
    # the tally maps every id through the mixture's own lookup: cluster k of source s is global
    # cluster (clusters before s) + k, so each id's tokens land in its own source's clusters
    k0 = m.layouts[0].num_clusters if len(m.layouts) > 1 else 0
    n0 = int(m.infos[1].offset)
    from_short = [i for i in ids if i < n0]
    from_long = [i for i in ids if i >= n0]
    assert from_short and from_long
    assert st.tokens is not None and int(st.tokens[:k0].sum()) > 0 and int(st.tokens[k0:].sum()) > 0


def test_report_shows_each_sources_tokens_from_the_state_directory(built_mix, tmp_path) -> None:
    from contextlib import ExitStack

    from croupier.apps import report
    from croupier.client.dataset import CroupierIterableDataset
    from croupier.server.durability.checkpoint_store import CheckpointStore
    from croupier.server.serving.service import describe
    from croupier.topology import Topology
    from jobs import start_server

    mix, _ = built_mix
    state = tmp_path / "state"
    with ExitStack() as stack:
        job = token_mix_job(mix, tmp_path / "side", CheckpointStore(state))
        server, port = start_server(stack, job, checkpoint=True)
        (state / "server.json").write_text(json.dumps(dict(describe(server), mix=str(mix))))
        data = CroupierIterableDataset(f"127.0.0.1:{port}", "t", cache_dir=tmp_path / "c", steps=9,
                                       topology=Topology(0, 1))
        assert {s["_croupier_step"] for s in data} == set(range(9))
        data.close()
    got = report.from_state_dir(state)
    assert got.source_names == ("short", "long") and got.source_tokens is not None
    assert got.source_token_targets is not None
    assert int(got.source_tokens.sum()) == got.step * 512 == int(got.source_token_targets.sum())
    assert got.step >= 9 and "draws over time not replayed: the job is dealt in tokens" in got.notes
    table = report.source_table(got)
    assert "tokens dealt" in table and f"{int(got.source_tokens[0]):,}" in table
