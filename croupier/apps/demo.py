"""`croupier demo`: the whole path on one machine, in a few minutes on 2 CPU cores.

1. corpus   a built-in long-tailed corpus (`croupier.shards.build.synthetic`, deterministic), or
            the user's JSON lines (`--corpus PATH`)
2. build    MDS shards + embeddings + k-means clusters + sidecar (`croupier.shards.build.builder`)
3. serve    `croupier serve` in its own process group, policy clusterclip (clip auto)
4. train    `torchrun --nproc_per_node 2 -m croupier.apps.demo_train`: a tiny byte-level LM,
            each rank streaming its slices through the client; it checkpoints halfway
5. kill     SIGKILL the server, restart it on the same state directory: it resumes from its
            durable checkpoint; the ranks resume from theirs (model, optimizer, data token)
6. train    the second half
7. verify   the ids every rank trained on, over both halves, equal the sequence of one
            uninterrupted sampler run (replayed in-process): resume is exact
8. report   a per-cluster table (size, draws, passes, clipped, loss) and PNGs + index.html

Every child runs in its own process group and is killed in a `finally` (and at exit), so an
error or Ctrl-C leaves no process behind; the client reads shards without shared memory.
Processes a child starts in sessions of their own (torchrun's workers) escape its group, so
every child also carries a run tag in its environment, which its descendants inherit, and
the cleanup kills every process that holds the tag, wherever it lives.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from croupier.errors import ConfigError, CroupierError

MARKER = ".croupier-demo"
JOB = "demo"
RUN_TAG_ENV = "CROUPIER_DEMO_RUN"
"""Environment variable that tags every process a demo run starts, grandchildren included."""


class DemoError(CroupierError):
    """A stage of the demo failed; the message names the stage and where its log is."""


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs. Defaults: the README's command."""

    out: Path = Path("croupier-demo")
    corpus: Path | None = None
    text_field: str = "text"
    docs: int = 2000
    topics: int = 24
    alpha: float = 1.2
    clusters: int | None = None
    embedder: str = "minilm"
    steps: int = 300
    global_batch: int = 16
    world: int = 2
    policy: str = "clusterclip"
    clip: str = "auto"
    context: int = 64
    seed: int = 0
    timeout_s: float = 900.0
    verbose: bool = True

    def __post_init__(self) -> None:
        if self.steps < 4:
            raise ConfigError(f"demo steps must be >= 4 (two halves of at least 2), got {self.steps}")
        if self.world < 1:
            raise ConfigError(f"world size must be >= 1, got {self.world}")
        if self.global_batch % self.world:
            raise ConfigError(f"global batch {self.global_batch} is not divisible by world size {self.world}")
        if self.corpus is None and self.docs < 2 * self.topics:
            raise ConfigError(f"the built-in corpus needs >= 2 documents per topic: {self.docs} docs, {self.topics} topics")
        if self.corpus is not None and not Path(self.corpus).exists():
            raise ConfigError(f"corpus {str(self.corpus)!r} does not exist")

    @property
    def half(self) -> int:
        return self.steps // 2


@dataclass
class DemoResult:
    """Where the outputs are and what the run showed."""

    out: Path
    report_dir: Path
    table: str
    resume_exact: bool
    resumed_from: int | None
    steps: int
    seconds: float
    pids: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


# -- child processes ----------------------------------------------------------------------------
def tagged_processes(tag: str, exact: bool = True) -> list[int]:
    """Pids of live processes whose environment has RUN_TAG_ENV equal to `tag` (or, with
    `exact` False, starting with it). Only this user's processes are readable: that is all
    a demo starts."""
    want = f"{RUN_TAG_ENV}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        if any(v == want if exact else v.startswith(want) for v in env):
            found.append(int(entry))
    return found


def kill_tagged(tag: str, exact: bool = True, timeout_s: float = 10.0) -> None:
    """SIGKILLs every process tagged `tag` until none is left (they cannot fork once killed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pids = tagged_processes(tag, exact)
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)


class Children:
    """Child processes, each in its own session/process group and tagged in its environment;
    `kill_tree` ends one child with all its descendants, `kill_all` every one of them."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.pids: list[int] = []
        self.run_tag = uuid.uuid4().hex
        self._tags: dict[int, str] = {}
        self._lock = threading.Lock()
        atexit.register(self.kill_all)

    def start(self, cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            tag = f"{self.run_tag}.{len(self.pids)}"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**env, RUN_TAG_ENV: tag}, start_new_session=True)
        with self._lock:
            self.procs.append(proc)
            self.pids.append(proc.pid)
            self._tags[proc.pid] = tag
        return proc

    def kill_tree(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """`kill(proc, sig)`, then SIGKILL every process it started, in any session."""
        self.kill(proc, sig)
        kill_tagged(self._tags.get(proc.pid, f"{self.run_tag}.?"))

    @staticmethod
    def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL, wait_s: float = 20.0) -> None:
        """Signals the process's whole group, waits for it, then SIGKILLs the group's leftovers."""
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(timeout=wait_s)
        try:  # grandchildren (torchrun's workers) live in the same group
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def kill_all(self) -> None:
        with self._lock:
            procs = list(self.procs)
            self.procs.clear()
        for proc in procs:
            self.kill(proc)
        kill_tagged(self.run_tag + ".", exact=False)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.pop("CROUPIER_TOKEN", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen | None = None,
          log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise DemoError(f"{what}: the process exited with status {proc.returncode}; see {log}")
        time.sleep(0.1)
    raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}" + (f"; see {log}" if log else ""))


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- the demo --------------------------------------------------------------------------------
class Demo:
    """One demo run; `run()` does every stage and always cleans up."""

    def __init__(self, cfg: DemoConfig, echo: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out).resolve()
        self.echo = echo or ((lambda s: print(s, flush=True)) if cfg.verbose else (lambda s: None))
        self.children = Children()
        self.env = _env()
        self.timings: dict[str, float] = {}
        self.dataset = self.out / "dataset"
        self.state = self.out / "state"
        self.run_dir = self.out / "run"
        self.logs = self.out / "logs"
        self.server: subprocess.Popen | None = None
        self.address = ""
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # -- stages ------------------------------------------------------------------------------
    def _prepare_out(self) -> None:
        if self.out.exists() and any(self.out.iterdir()):
            if not (self.out / MARKER).exists():
                raise ConfigError(f"output folder {self.out} exists and is not a demo folder; "
                                  "choose another --out or empty it")
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / MARKER).write_text("croupier demo output; safe to delete\n")
        for d in (self.run_dir, self.logs):
            d.mkdir(parents=True, exist_ok=True)

    def _corpus(self) -> Path:
        if self.cfg.corpus is not None:
            self.echo(f"[1/8] corpus: {self.cfg.corpus} (field {self.cfg.text_field!r})")
            return Path(self.cfg.corpus).resolve()
        from croupier.shards.build.synthetic import generate_corpus, write_jsonl

        path = self.out / "corpus.jsonl"
        docs = generate_corpus(self.cfg.docs, self.cfg.topics, alpha=self.cfg.alpha, seed=self.cfg.seed)
        write_jsonl(path, docs)
        sizes = np.bincount([d["topic"] for d in docs], minlength=self.cfg.topics)
        self.echo(f"[1/8] corpus: {len(docs)} built-in documents, {self.cfg.topics} topics "
                  f"(largest {sizes.max()}, smallest {sizes.min()} documents) -> {path}")
        return path

    def _build(self, corpus: Path) -> None:
        from croupier.shards.build.builder import BuildConfig, build

        clusters = self.cfg.clusters or (self.cfg.topics if self.cfg.corpus is None else None)
        t0 = time.perf_counter()
        res = build(BuildConfig(out=str(self.dataset), inputs=(str(corpus),), text_field=self.cfg.text_field,
                                embedder=self.cfg.embedder, clusters=clusters, seed=self.cfg.seed,
                                progress=False, overwrite=True))
        self.timings["build"] = time.perf_counter() - t0
        self.echo(f"[2/8] build: {res.num_samples} samples in {res.num_clusters} clusters ({self.cfg.embedder} "
                  f"embeddings, spherical k-means), MDS shards + sidecar in {self.timings['build']:.1f}s -> {self.dataset}")

    def _serve_cmd(self) -> list[str]:
        c = self.cfg
        cmd = [sys.executable, "-m", "croupier", "serve", str(self.dataset), "--job", JOB, "--policy", c.policy,
               "--global-batch", str(c.global_batch), "--seed", str(c.seed), "--state-dir", str(self.state),
               "--port", "0", "--lookahead", "8", "--checkpoint-every", str(max(1, c.steps // 10)),
               "--log-level", "WARNING", "--grace", "1"]
        if c.policy in ("clusterclip", "weighted") and c.clip:
            cmd += ["--clip", c.clip]
        if c.clip == "auto" or c.policy in ("g2s", "s2g"):
            cmd += ["--budget-steps", str(c.steps)]
        if c.policy in ("g2s", "s2g"):
            cmd += ["--switch-fraction", "0.5"]
        if c.policy in ("clusterclip", "weighted"):
            cmd += ["--on-exhausted", "random"]
        return cmd

    def _start_server(self, n: int) -> dict:
        log = self.logs / f"server.{n}.log"
        info_path = self.state / "server.json"
        proc = self.children.start(self._serve_cmd(), log, self.env)
        self.server = proc

        def ready() -> dict | None:
            try:
                info = json.loads(info_path.read_text())
            except (OSError, ValueError):
                return None
            return info if info.get("pid") == proc.pid else None

        info = _wait(ready, 120, f"the sampler server to start (run {n})", proc, log)
        self.address = f"127.0.0.1:{info['port']}"
        return info

    def _kill_server(self) -> None:
        if self.server is not None:
            Children.kill(self.server, signal.SIGKILL)

    def _stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            Children.kill(self.server, signal.SIGTERM)

    def _torchrun(self, phase: int, stop_step: int, resume: bool) -> None:
        c = self.cfg
        log = self.logs / f"train.{phase}.log"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(c.world),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "croupier.apps.demo_train",
               "--server", self.address, "--job", JOB, "--cache", str(self.out / "cache"), "--run-dir", str(self.run_dir),
               "--stop-step", str(stop_step), "--text-field", c.text_field, "--context", str(c.context),
               "--seed", str(c.seed)]
        if resume:
            cmd.append("--resume")
        t0 = time.perf_counter()
        proc = self.children.start(cmd, log, self.env)
        records = self.run_dir / "records.rank0.jsonl"
        last_print = time.monotonic()
        shown = None
        deadline = time.monotonic() + c.timeout_s
        while proc.poll() is None:
            if time.monotonic() > deadline:
                self.children.kill_tree(proc)
                raise DemoError(f"training phase {phase} timed out after {c.timeout_s:.0f} s; see {log}")
            time.sleep(0.2)
            if time.monotonic() - last_print >= 5.0:
                last_print = time.monotonic()
                step, loss = _last_record(records)
                if step is not None and step != shown and step >= (c.half if resume else 0):
                    shown = step
                    self.echo(f"      step {step + 1}/{c.steps}  loss {loss:.3f}")
        self.children.kill_tree(proc)  # reaps it and any straggler, in its group or not
        if proc.returncode != 0:
            raise DemoError(f"training phase {phase} failed (exit {proc.returncode}); see {log}:\n{_tail(log)}")
        self.timings[f"train.{phase}"] = time.perf_counter() - t0

    # -- rank progress watcher ---------------------------------------------------------------------
    def _start_watcher(self) -> None:
        from croupier.apps import report

        path = self.state / report.RANK_HISTORY_FILE
        self._watch_stop.clear()

        def loop() -> None:
            import grpc

            from croupier.client.channel import open_channel
            from croupier.proto.croupier.v1 import croupier_pb2, croupier_pb2_grpc

            channel = open_channel(self.address)
            stub = croupier_pb2_grpc.SamplerStub(channel)
            try:
                with open(path, "a", encoding="utf-8") as f:
                    while not self._watch_stop.wait(0.25):
                        try:
                            st = stub.GetStatus(croupier_pb2.GetStatusRequest(include_clusters=False), timeout=2.0)
                        except grpc.RpcError:
                            continue
                        ranks = sorted(st.ranks, key=lambda r: r.rank)
                        if len(ranks) == self.cfg.world:
                            f.write(json.dumps({"t": time.time(), "steps": [int(r.next_step) for r in ranks]}) + "\n")
                            f.flush()
            finally:
                channel.close()

        self._watcher = threading.Thread(target=loop, name="croupier-demo-watch", daemon=True)
        self._watcher.start()

    def _stop_watcher(self) -> None:
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
            self._watcher = None

    # -- verification and report ------------------------------------------------------------------
    def _trained_batches(self) -> dict[int, np.ndarray]:
        """Global batch of every trained step, reassembled from the ranks' records (rank order)."""
        per_rank: list[dict[int, list[int]]] = []
        for r in range(self.cfg.world):
            steps: dict[int, list[int]] = {}
            for line in (self.run_dir / f"records.rank{r}.jsonl").read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    steps[int(rec["step"])] = rec["ids"]
            per_rank.append(steps)
        common = set(per_rank[0])
        for s in per_rank[1:]:
            common &= set(s)
        return {t: np.asarray(sum((p[t] for p in per_rank), []), dtype=np.int64) for t in sorted(common)}

    def _verify_and_count(self) -> tuple[bool, Any, Any, Any]:
        """Replays the sampler; returns (exact, layout, config, counters at the last trained step)."""
        from croupier.datasets import open_dataset
        from croupier.server.sampling.policy import PolicyConfig
        from croupier.server.sampling.sampler import Sampler

        meta = self._status()
        job = meta.job
        layout = open_dataset(self.dataset).layout(job.selection or None)
        config = PolicyConfig.from_dict(json.loads(job.policy_json))
        sampler = Sampler(layout, config, int(job.global_batch), int(job.seed))
        if sampler.fingerprint != job.sampler_fingerprint:
            raise DemoError(f"replayed sampler {sampler.fingerprint} is not the server's {job.sampler_fingerprint}")
        trained = self._trained_batches()
        exact = sorted(trained) == list(range(self.cfg.steps))
        for t in range(self.cfg.steps):
            batch = sampler.next_batch()
            if exact and not np.array_equal(batch, trained.get(t)):
                exact = False
        return exact, layout, config, sampler.counters()

    def _status(self) -> Any:
        from croupier.apps import report

        return report.fetch_status(self.address)

    def _cluster_losses(self, layout: Any) -> np.ndarray:
        """Final model's mean loss on up to 16 documents of every cluster."""
        import torch

        from croupier.apps.demo_train import CKPT_DIR, MODEL_FILE
        from croupier.apps.tinylm import TinyLMConfig, build_model, encode, example_losses
        from croupier.shards.build.mds import MDSSource

        saved = torch.load(self.run_dir / CKPT_DIR / MODEL_FILE, map_location="cpu", weights_only=False)
        model = build_model(TinyLMConfig(**saved["config"]))
        model.load_state_dict(saved["model"])
        starts, sizes = layout.offsets[:-1], layout.sizes
        take = np.minimum(sizes, 16)
        pos = np.concatenate([np.arange(s, s + t) for s, t in zip(starts, take)])
        ids = layout.ids_at(pos)
        with MDSSource(self.dataset) as src:
            texts = src.get(ids, self.cfg.text_field)
        losses = example_losses(model, encode([str(t) for t in texts], saved["config"]["context"]))
        return np.add.reduceat(losses, np.concatenate([[0], np.cumsum(take)[:-1]])) / take

    def _report(self, layout: Any, config: Any, counters: Any) -> tuple[Path, str]:
        from croupier.apps import report

        status = self._status()
        data = report.ReportData(
            source=f"demo run (server {self.address}, {self.cfg.steps} trained steps)", policy=config.policy,
            clip=int(status.clip) or None, step=self.cfg.steps, global_batch=self.cfg.global_batch,
            seed=self.cfg.seed, sizes=np.asarray(counters.sizes), draws=counters.draws, passes=counters.passes,
            clipped_at=counters.clipped_at, max_lag=None)
        steps, hist, _ = report.replay_history(layout, config, self.cfg.global_batch, self.cfg.seed, self.cfg.steps)
        data.history_steps, data.history = steps, hist
        data.notes.append("draws over time: replayed sampler (checked equal, step by step, to what the ranks trained on)")
        lag = report.read_rank_history(self.state / report.RANK_HISTORY_FILE)
        if lag is not None:
            data.rank_times, data.rank_steps = lag
        out = self.out / "report"
        report.write_report(data, out)
        losses = self._cluster_losses(layout)
        return out, _demo_table(data, losses)

    # -- run -----------------------------------------------------------------------------------------
    def run(self) -> DemoResult:
        t_start = time.perf_counter()
        c = self.cfg
        old_handler = None
        if threading.current_thread() is threading.main_thread():
            old_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            self._prepare_out()
            corpus = self._corpus()
            self._build(corpus)
            info = self._start_server(1)
            self.echo(f"[3/8] serve: croupier serve on {self.address}, policy {c.policy}"
                      f"{' clip ' + c.clip if c.policy == 'clusterclip' else ''}, global batch {c.global_batch}, "
                      f"state in {self.state} (pid {info['pid']})")
            self._start_watcher()
            self.echo(f"[4/8] train: torchrun --nproc_per_node {c.world} -m croupier.apps.demo_train, steps 0..{c.half - 1}, "
                      f"then checkpoint (model, optimizer, data token)")
            self._torchrun(1, c.half, resume=False)
            self._stop_watcher()
            self._kill_server()
            self.echo(f"[5/8] kill: server SIGKILLed after step {c.half - 1}; restarting it on {self.state}")
            info = self._start_server(2)
            self.echo(f"      restarted on {self.address}: resumed from its durable checkpoint at step "
                      f"{info.get('resumed_from')}")
            self._start_watcher()
            self.echo(f"[6/8] train: ranks resume from their checkpoint at step {c.half}, train to step {c.steps - 1}")
            self._torchrun(2, c.steps, resume=True)
            self._stop_watcher()
            exact, layout, config, counters = self._verify_and_count()
            self.echo(f"[7/8] verify: {c.steps} trained global batches "
                      f"{'==' if exact else '!='} one uninterrupted sampler run -> resume is "
                      f"{'EXACT' if exact else 'NOT exact'}")
            if not exact:
                raise DemoError("the ids the ranks trained on differ from the uninterrupted sequence; "
                                f"see {self.run_dir}")
            report_dir, table = self._report(layout, config, counters)
            self._stop_server()
            self.echo("[8/8] report:\n" + table)
            seconds = time.perf_counter() - t_start
            self.echo(f"\nDone in {seconds:.0f}s. Outputs in {self.out}:\n"
                      f"  report     {report_dir}/index.html (sizes_vs_draws.png, passes.png, "
                      f"draws_over_time.png, rank_lag.png)\n"
                      f"  dataset    {self.dataset}\n  server     {self.state} (checkpoints, server.json)\n"
                      f"  training   {self.run_dir} (per-rank records, checkpoint)\n  logs       {self.logs}")
            return DemoResult(out=self.out, report_dir=report_dir, table=table, resume_exact=exact,
                              resumed_from=info.get("resumed_from"), steps=c.steps, seconds=seconds,
                              pids=self._all_pids(), timings=dict(self.timings))
        finally:
            self._stop_watcher()
            self._stop_server()
            self.children.kill_all()
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)

    def _all_pids(self) -> list[int]:
        pids = list(self.children.pids)
        path = self.run_dir / "pids.txt"
        if path.exists():
            pids += [int(x) for x in path.read_text().split()]
        return pids


def _raise_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt(f"signal {signum}")


def _last_record(path: Path) -> tuple[int | None, float]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None, 0.0
    for line in reversed(lines):
        try:
            rec = json.loads(line)
            return int(rec["step"]), float(rec["loss"])
        except (ValueError, KeyError):
            continue
    return None, 0.0


def _demo_table(data: Any, losses: np.ndarray) -> str:
    """Per-cluster table, largest first: size, draws, passes (draws/size), clipped at, loss."""
    order = np.argsort(-data.sizes, kind="stable")
    head = f"{'cluster':>7} {'size':>6} {'draws':>7} {'passes':>7} {'clipped':>10} {'loss':>6}"
    lines = [head, "-" * len(head)]
    for c in order:
        clipped = f"step {data.clipped_at[c]}" if data.clipped_at[c] >= 0 else "-"
        lines.append(f"{c:>7} {data.sizes[c]:>6} {data.draws[c]:>7} {data.draws[c] / data.sizes[c]:>7.2f} "
                     f"{clipped:>10} {losses[c]:>6.3f}")
    lines.append(f"clip {data.clip or 'none'}; {int((data.clipped_at >= 0).sum())} of {len(order)} clusters clipped; "
                 f"{int(data.draws.sum())} draws over {data.step} steps; loss = final model, nats/byte")
    return "\n".join(lines)


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] | None = None) -> DemoResult:
    """Runs the demo (see the module docstring)."""
    return Demo(cfg, echo).run()
