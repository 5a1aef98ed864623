"""Steps in tokens, embedded: every rank gets exactly G / D tokens every step (no padding, no
drop, no carry), and the concatenation of all ranks' tokens in step and rank order is the
stream of `croupier simulate --global-tokens`' documents (tokens + EOS); resumes (a ramp, 4
ranks to 2) continue at the exact token; a tokenizer that disagrees with the sidecar's counts
is refused naming the sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from cases.shards_build import read_back
from croupier.cli import main
from croupier.client.dataset import CroupierIterableDataset
from croupier.client.packing import PackedSequences
from croupier.errors import DatasetError
from croupier.format.sidecar import Sidecar
from croupier.topology import Topology

EOS = 102  # the WordPiece tokenizer's [SEP]: it has no EOS token
POLICY = {"policy": "clusterclip", "clip": 3, "seed": 1}


@pytest.fixture(scope="module")
def counted(tmp_path_factory, build_dataset, tiny_tokenizer) -> Path:
    from croupier.shards.build.token_counts import add_token_counts

    ds = build_dataset(tmp_path_factory.mktemp("tok"), num_docs=240, topics=4)
    add_token_counts(str(ds), tokenizer=str(tiny_tokenizer), progress=False)
    return ds


def tokenizer(path: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def packed(ds: Path, cache: Path, tok_path: Path, rank: int, world: int, *, steps: int, schedule: str | None = None,
           tokens: int | None = 512, rows: int = 2) -> PackedSequences:
    opts = {"token_schedule": schedule} if schedule else {"global_tokens": tokens}
    data = CroupierIterableDataset.embedded(ds, cache_dir=cache, topology=Topology(rank=rank, world=world),
                                            steps=steps, **opts, **POLICY)
    per = (512 if tokens is None else tokens) // world
    return PackedSequences(data, seq_len=per // rows, rows=rows, tokenizer=tokenizer(tok_path), eos_id=EOS)


def simulated_stream(ds: Path, steps: int, tok_path: Path, cache: Path, extra: list[str], capsys) -> list[list[int]]:
    """Per step, the tokens of `simulate --global-tokens`' documents (tokens + EOS), cut at first_skip / last_end."""
    assert main(["simulate", "--dataset", str(ds), "--policy", "clusterclip", "--clip", "3", "--seed", "1",
                 "--steps", str(steps), "--format", "jsonl", *extra]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    texts = [r["text"] for r in read_back(ds, cache)]
    tok = tokenizer(tok_path)
    out = []
    for r in rows:
        stream: list[int] = []
        n = len(r["indices"])
        for i, doc in enumerate(r["indices"]):
            toks = tok(texts[doc], add_special_tokens=False)["input_ids"] + [EOS]
            stream += toks[r["first_skip"] if i == 0 else 0:r["last_end"] if i == n - 1 else len(toks)]
        out.append(stream)
    return out


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_gets_exactly_its_tokens_and_together_they_are_the_stream(counted, tmp_path, tiny_tokenizer,
                                                                           world, workers, capsys) -> None:
    steps = 12
    want = simulated_stream(counted, steps, tiny_tokenizer, tmp_path / "rb", ["--global-tokens", "512"], capsys)
    per_rank = []
    for rank in range(world):
        items = list(DataLoader(packed(counted, tmp_path / "c", tiny_tokenizer, rank, world, steps=steps),
                                batch_size=None, num_workers=workers))
        assert [int(it["_croupier_step"]) for it in items] == list(range(steps))
        for it in items:
            assert tuple(it["input_ids"].shape) == (2, 256 // world)
            assert bool(it["loss_mask"].all()) and bool((it["labels"] == it["input_ids"]).all())
            assert int(it["cu_seqlens"][0]) == 0 and int(it["cu_seqlens"][-1]) == 512 // world
        per_rank.append([it["input_ids"].flatten().tolist() for it in items])
    for t in range(steps):
        assert [x for r in range(world) for x in per_rank[r][t]] == want[t], t


def test_a_ramp_resumes_in_its_middle_and_four_ranks_continue_on_two(counted, tmp_path, tiny_tokenizer,
                                                                    capsys) -> None:
    schedule = "0:128,4:256,8:512"  # global tokens x4 over 8 steps; a step's rows: its tokens / seq_len
    want = simulated_stream(counted, 12, tiny_tokenizer, tmp_path / "rb", ["--token-schedule", schedule], capsys)

    def ramp(rank: int, world: int, steps: int) -> PackedSequences:
        data = CroupierIterableDataset.embedded(counted, cache_dir=tmp_path / "c", token_schedule=schedule,
                                                topology=Topology(rank=rank, world=world), steps=steps, **POLICY)
        return PackedSequences(data, seq_len=16, rows=1, tokenizer=tokenizer(tiny_tokenizer), eos_id=EOS)

    first = ramp(0, 4, 6)
    head = []
    for it in first:
        assert tuple(it["input_ids"].shape) == ([128, 128, 128, 128, 256, 256][it["_croupier_step"]] // 4 // 16, 16)
        head.append(it["input_ids"].flatten().tolist())
        if it["_croupier_step"] == 5:
            break
    state = first.state_dict(next_step=6)  # in the middle of the ramp's 256-token part
    assert head == [w[:len(h)] for w, h in zip(want, head)]
    for world in (4, 2):
        tail = []
        for rank in range(world):
            p = ramp(rank, world, 4)
            p.load_state_dict(state)
            tail.append([it["input_ids"].flatten().tolist() for it in p])
        for t in range(4):  # steps 6..9: 256, 256, 512, 512 tokens
            assert [x for r in range(world) for x in tail[r][t]] == want[6 + t], (world, t)
    with pytest.raises(Exception, match="not a multiple of seq_len"):
        list(PackedSequences(CroupierIterableDataset.embedded(counted, cache_dir=tmp_path / "c", global_tokens=96,
                                                              topology=Topology(0, 2), steps=1, **POLICY),
                             seq_len=64, rows=1, tokenizer=tokenizer(tiny_tokenizer), eos_id=EOS))


def test_a_tokenizer_that_disagrees_with_the_sidecars_counts_is_refused_naming_the_sample(counted, tmp_path,
                                                                                         tiny_tokenizer) -> None:
    import shutil

    counted = Path(shutil.copytree(counted, tmp_path / "copy"))  # the module's dataset keeps its counts
    side = Sidecar.open(counted)
    counts = np.asarray(side.token_counts()).copy()
    counts[:] += 1  # as if another tokenizer had counted
    side.write_token_counts(counts, {"tokenizer": "another"})
    p = packed(counted, tmp_path / "c", tiny_tokenizer, 0, 1, steps=2)
    with pytest.raises(DatasetError, match=r"sample \d+: the tokenizer gives \d+ tokens, the job dealt it as \d+"):
        list(p)


def served_token_job(stack, ds: Path, tokens: int = 512) -> str:
    """`croupier serve DS --policy clusterclip --clip 3 --seed 1 --global-tokens 512`, in process."""
    from croupier.server.job.job import Job, JobSpec
    from croupier.server.sampling.policy import PolicyConfig
    from croupier.server.sampling.token_stream import TokenSchedule, mean_stream_tokens, plan_tokens
    from jobs import start_server

    side = Sidecar.open(ds)
    layout, counts = side.layout(), np.asarray(side.token_counts())
    schedule = TokenSchedule.constant(tokens)
    chunk, policy = plan_tokens(schedule, mean_stream_tokens(counts, layout.ids_at(np.arange(layout.num_positions))),
                                None, PolicyConfig.from_options(policy="clusterclip", clip=3))
    job = Job(layout, policy, chunk, 1, spec=JobSpec(name="t", dataset_remote=str(ds),
                                                     dataset_fingerprint=side.fingerprint),
              tokens=(schedule, [(0, counts)], chunk))
    _, port = start_server(stack, job)
    return f"127.0.0.1:{port}"


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [2, 4])
def test_a_served_token_job_deals_the_same_tokens(counted, tmp_path, tiny_tokenizer, world, workers,
                                                 capsys) -> None:
    from contextlib import ExitStack

    steps = 50
    want = simulated_stream(counted, steps, tiny_tokenizer, tmp_path / "rb", ["--global-tokens", "512"], capsys)
    with ExitStack() as stack:
        addr = served_token_job(stack, counted)
        per_rank = []
        for rank in range(world):
            data = CroupierIterableDataset(addr, "t", cache_dir=tmp_path / "c", steps=steps,
                                           topology=Topology(rank=rank, world=world))
            p = PackedSequences(data, seq_len=256 // world, rows=2, tokenizer=tokenizer(tiny_tokenizer), eos_id=EOS)
            items = list(DataLoader(p, batch_size=None, num_workers=workers))
            assert [int(it["_croupier_step"]) for it in items] == list(range(steps))
            assert all(tuple(it["input_ids"].shape) == (2, 256 // world) for it in items)
            per_rank.append([it["input_ids"].flatten().tolist() for it in items])
            data.close()
    for t in range(steps):
        assert [x for r in range(world) for x in per_rank[r][t]] == want[t], t


def test_report_of_a_served_token_job_reads_its_dealer(counted, tmp_path) -> None:
    import json
    from contextlib import ExitStack

    from croupier.apps import report
    from croupier.server.durability.checkpoint_store import CheckpointStore
    from croupier.server.job.job import Job, JobSpec
    from croupier.server.sampling.policy import PolicyConfig
    from croupier.server.sampling.token_stream import TokenSchedule, mean_stream_tokens, plan_tokens
    from croupier.server.serving.service import describe
    from jobs import start_server

    side = Sidecar.open(counted)
    layout, counts = side.layout(), np.asarray(side.token_counts())
    schedule = TokenSchedule.constant(512)
    chunk, policy = plan_tokens(schedule, mean_stream_tokens(counts, layout.ids_at(np.arange(layout.num_positions))),
                                None, PolicyConfig.from_options(policy="clusterclip", clip=3))
    state = tmp_path / "state"
    with ExitStack() as stack:
        job = Job(layout, policy, chunk, 1, spec=JobSpec(name="t", dataset_remote=str(counted),
                                                         dataset_fingerprint=side.fingerprint),
                  tokens=(schedule, [(0, counts)], chunk), store=CheckpointStore(state))
        server, port = start_server(stack, job, checkpoint=True)
        (state / "server.json").write_text(json.dumps(dict(describe(server), dataset=str(counted))))
        data = CroupierIterableDataset(f"127.0.0.1:{port}", "t", cache_dir=tmp_path / "c", steps=7,
                                       topology=Topology(0, 1))
        assert len({s["_croupier_step"] for s in data}) == 7
        data.close()
        draws = job.status().draws.copy()
    got = report.from_state_dir(state)
    assert got.step >= 7 and np.array_equal(got.draws, draws)
    assert "draws over time not replayed: the job is dealt in tokens" in got.notes
