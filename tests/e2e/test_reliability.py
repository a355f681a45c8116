"""Fault tests (issue "Reliability"): worker crashes, a broker outage, graceful stops and a
backlog far above capacity. Every test runs real worker processes on the embedded broker and
checks the at-least-once contract by consuming the topics: every raw beat ends up in the
repaired topic or the DLQ, and de-duplication by (patient_id, seq) leaves exactly the raw set.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from stream.kafka import ensure_topics
from stream.tooling.broker import EmbeddedBroker, free_port, wait_for_port
from tests.conftest import require, unique_topics_config
from tests.helpers import (
    TopicFollower,
    consumed,
    in_thread,
    joined,
    metric_sum,
    rss_bytes,
    run_simulator,
    scrape,
    start_process,
    start_worker,
    try_scrape,
    wait_for_metrics,
    wait_for_stable_group,
    wait_until,
    write_config,
)

# Every worker runs torch on one thread: on two busy cores, two threads per process made the
# model about 10x slower here (threads spinning against each other and the other processes).
ONE_THREAD = "model.torch_threads=1"
FETCH_BYTES = 1 << 20  # per-partition fetch size in the backlog test
OUTAGE_S = 22  # broker down for this long (the issue asks for at least 20 s)
MIXED_DROPOUT = (
    "simulator.dropout.block_prob=0.15",
    "simulator.dropout.gap_prob=0.35",
    "simulator.dropout.burst_prob=0.25",
    "simulator.dropout.drop_prob=0.15",
    "simulator.dropout.lost_beat_prob=0.01",
)


def read_raw(cfg, sent: int) -> TopicFollower:
    """The raw topic, read by consuming it (never from end offsets, which the embedded broker
    reports wrong) until it holds `sent` beats and nothing new comes."""
    raw = TopicFollower(cfg, cfg.topics.raw)
    try:
        raw.follow(lambda f: len(f.counts) >= sent, timeout_s=120, idle_s=1.0)
    finally:
        raw.close()
    return raw


def raw_keys(cfg, sent: int) -> set:
    """(patient_id, seq) of every beat on the raw topic."""
    return read_raw(cfg, sent).keys()


def repaired_or_dead(cfg, raw: set, timeout_s: float, idle_s: float = 3.0) -> TopicFollower:
    """Follow the repaired and DLQ topics until they hold every raw beat, then until nothing
    new came for idle_s (late duplicates are counted too)."""
    out = TopicFollower(cfg, cfg.topics.repaired, cfg.topics.dlq)
    try:
        out.follow(lambda f: raw <= f.keys(), timeout_s=timeout_s, idle_s=idle_s)
    finally:
        out.close()
    return out


def stop_all(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def start_workers(cfg, tmp_path: Path, names, *sets: str) -> dict:
    """name -> (process, metrics port), all up (model loaded, metrics served)."""
    workers = {name: start_worker(cfg, tmp_path, name, *sets) for name in names}
    for proc, port in workers.values():
        wait_for_metrics(port, proc)
    return workers


# --------------------------------------------------------------------------- worker crash

KILLS = 3


@pytest.mark.slow
def test_worker_kill_9_loses_nothing(pipeline_config, checkpoint, tmp_path):
    """Three workers on six partitions; kill -9 one of them at random moments (seeded) and
    restart it. Nothing is lost; duplicates stay within the uncommitted batches."""
    rng = random.Random(1234)
    cfg = pipeline_config(
        "simulator.patients=16",
        "simulator.rate=2000",
        "simulator.beats=52000",
        "simulator.seed=7",
        ONE_THREAD,
        *MIXED_DROPOUT,
    )
    assert cfg.kafka.partitions == 6
    names = [f"w{i}" for i in range(3)]
    ensure_topics(cfg.kafka, cfg.topics)
    workers = start_workers(cfg, tmp_path, names)
    started = time.monotonic()
    kills = []
    try:
        sim_thread, sim = in_thread(run_simulator, cfg)
        for _ in range(KILLS):
            time.sleep(rng.uniform(3.0, 7.0))
            # The victim is a random worker that owns partitions right now.
            owners = [
                n
                for n in names
                if metric_sum(try_scrape(workers[n][1]) or {}, "ecg_assigned_partitions") > 0
            ]
            victim = rng.choice(sorted(owners) or names)
            proc, port = workers[victim]
            consumed = metric_sum(try_scrape(port) or {}, "ecg_messages_consumed_total")
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
            kills.append((victim, round(time.monotonic() - started, 1), int(consumed)))
            time.sleep(rng.uniform(0.5, 3.0))
            workers[victim] = start_worker(cfg, tmp_path, victim)
        result = joined(sim_thread, sim, timeout_s=300)
        for proc, port in workers.values():
            wait_for_metrics(port, proc)
        raw = raw_keys(cfg, result.sent)
        out = repaired_or_dead(cfg, raw, timeout_s=300, idle_s=5.0)
        for name, (proc, _) in workers.items():
            assert proc.poll() is None, f"{name} exited with {proc.returncode}"
    finally:
        stop_all([proc for proc, _ in workers.values()])

    lost = raw - out.keys()
    duplicates = out.duplicates()
    # Bound: a worker commits after every batch, and a batch holds at most worker.max_batch
    # records (the worker's consumer polls with max_poll_records = max_batch, whatever
    # kafka.max_poll_records says). A kill replays at most the victim's one published but
    # uncommitted batch. Each kill also causes two rebalances (the victim's session expires,
    # the restarted worker joins); survivors commit their pending batch before giving up
    # partitions, and one whose commit is refused in a rebalance replays at most that one
    # batch. So duplicates <= kills * max_batch * (1 + 2 * survivors). This holds because a
    # member that missed generations does not resume a partition from its stale position
    # (`Worker.align_positions`): before that, 2,002-4,007 duplicates turned up in some runs.
    batch = cfg.worker.max_batch
    bound = len(kills) * batch * (1 + 2 * (len(names) - 1))
    print(
        f"worker crash: kills (worker, s, beats it had consumed) {kills}; beats sent "
        f"{result.sent}, raw topic {len(raw)} unique, "
        f"repaired+DLQ {len(out.keys())} unique, lost {len(lost)}, duplicates {duplicates} "
        f"(bound {bound}); {time.monotonic() - started:.0f} s"
    )
    assert len(kills) >= 3
    assert result.sent >= 50000 and result.acked == result.sent
    assert len(raw) == result.sent
    assert not lost, f"{len(lost)} raw beats never repaired, e.g. {sorted(lost)[:5]}"
    assert out.keys() == raw  # de-duplicated by (patient_id, seq): exactly the raw set
    assert duplicates <= bound, rebalance_timeline(tmp_path, names)


def rebalance_timeline(tmp_path: Path, names) -> str:
    """Every worker's partition assignments and revocations, in time order."""
    events = [
        f"{line[:23]} {name}: {line.split('stream.worker: ')[1][:60]}"
        for name in names
        for line in (tmp_path / f"{name}.log").read_text().splitlines()
        if "partitions revoked" in line or "partitions assigned" in line
    ]
    return "\n".join(sorted(events))


# --------------------------------------------------------------------------- graceful stop


@pytest.mark.slow
def test_a_dead_model_process_stops_its_worker_and_loses_nothing(
    pipeline_config, checkpoint, tmp_path
):
    """kill -9 a worker's model process under load: the worker stops with a one-line error
    (exit 1) instead of hanging, and its replacement repairs every beat."""
    cfg = pipeline_config(
        "simulator.patients=8", "simulator.rate=500", "simulator.beats=5000", ONE_THREAD
    )
    ensure_topics(cfg.kafka, cfg.topics)
    workers = start_workers(cfg, tmp_path, ["w0"])
    proc, port = workers["w0"]
    try:
        sim_thread, sim = in_thread(run_simulator, cfg)
        deadline = time.monotonic() + 60
        while metric_sum(scrape(port), "ecg_messages_consumed_total") < 500:
            assert time.monotonic() < deadline, "the worker is not consuming"
            time.sleep(0.2)
        ready = re.search(r"ready in process (\d+)", (tmp_path / "w0.log").read_text())
        os.kill(int(ready.group(1)), signal.SIGKILL)
        assert proc.wait(timeout=30) == 1
        log = (tmp_path / "w0.log").read_text()
        errors = [line for line in log.splitlines() if "error:" in line]
        assert errors == ["ecg-stream worker: error: the model process died (exit code -9)"], log
        assert "Traceback" not in log
        workers["w1"] = start_worker(cfg, tmp_path, "w1")
        result = joined(sim_thread, sim, timeout_s=120)
        raw = raw_keys(cfg, result.sent)
        out = repaired_or_dead(cfg, raw, timeout_s=120)
    finally:
        stop_all([p for p, _ in workers.values()])
    assert raw and not raw - out.keys()


@pytest.mark.slow
def test_sigterm_finishes_the_batch_and_commits(pipeline_config, checkpoint, tmp_path):
    """Under load, SIGTERM one worker after the other: each finishes its batch, flushes,
    commits and exits 0 within 10 s; restarted in the same group, nothing is processed twice."""
    cfg = pipeline_config(
        "simulator.patients=12",
        "simulator.rate=700",
        "simulator.beats=16000",
        "simulator.seed=9",
        ONE_THREAD,
        *MIXED_DROPOUT,
    )
    names = ["w0", "w1"]
    ensure_topics(cfg.kafka, cfg.topics)
    workers = start_workers(cfg, tmp_path, names)
    stops = []
    try:
        sim_thread, sim = in_thread(run_simulator, cfg)
        for name in names:
            # Tansu 0.6.0 never elects a new leader when the leader leaves the group while a
            # rebalance is in progress: the group then hangs for good (kill -9 is fine, the
            # session expiry path re-elects). Real Kafka handles it; here each SIGTERM waits
            # until the group is stable again.
            wait_for_stable_group(cfg.kafka.partitions, [port for _, port in workers.values()])
            proc, port = workers[name]
            wait_until(lambda p=port: consumed(p) > 0, 60, f"{name} under load before its SIGTERM")
            busy = consumed(port)
            asked = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
            stops.append((name, busy, round(time.monotonic() - asked, 2), code))
            workers[name] = start_worker(cfg, tmp_path, name)
        result = joined(sim_thread, sim, timeout_s=180)
        raw = raw_keys(cfg, result.sent)
        out = repaired_or_dead(cfg, raw, timeout_s=180)
        for proc, port in workers.values():  # a restarted worker may still be loading
            wait_for_metrics(port, proc)
        after = {n: consumed(port) for n, (_, port) in workers.items()}
    finally:
        stop_all([proc for proc, _ in workers.values()])

    lost = raw - out.keys()
    print(
        f"graceful stop: (worker, beats consumed before, seconds to exit, code) {stops}; "
        f"consumed after the restart {after}; beats sent {result.sent}, repaired+DLQ "
        f"{len(out.keys())} unique, lost {len(lost)}, duplicates {out.duplicates()}"
    )
    assert after["w0"] > 0  # the restarted worker took its share again
    for name, busy, seconds, code in stops:
        assert busy > 0, f"{name} was not under load"
        assert code == 0 and seconds <= 10, f"{name}: exit code {code} after {seconds} s"
        log = (tmp_path / f"{name}.log").read_text()
        assert "received SIGTERM" in log and "stopped after" in log
    assert len(raw) == result.sent
    assert not lost
    assert out.keys() == raw
    assert out.duplicates() == 0


# --------------------------------------------------------------------------- backpressure


@pytest.mark.slow
def test_backlog_far_above_capacity(pipeline_config, checkpoint, tmp_path):
    """30,000 beats as fast as possible before any worker runs, then one worker: memory
    stays bounded while it drains, lag is visible and returns to 0."""
    cfg = pipeline_config(
        "simulator.patients=16",
        "simulator.speed=0",
        "simulator.beats=30000",
        "simulator.seed=4",
        ONE_THREAD,
        # The consumer buffers at most one fetch: 6 partitions x 1 MB here, far below the
        # backlog, so memory proportional to the backlog would show.
        f"kafka.max_partition_fetch_bytes={FETCH_BYTES}",
    )
    ensure_topics(cfg.kafka, cfg.topics)
    t0 = time.monotonic()
    result = run_simulator(cfg)
    burst_s = time.monotonic() - t0
    assert result.acked == result.sent >= 29000
    backlog = read_raw(cfg, result.sent)
    assert len(backlog.keys()) == result.sent

    proc, port = start_worker(cfg, tmp_path, "w0")
    samples = []  # (seconds, RSS bytes, lag, consumed)
    try:
        wait_for_metrics(port, proc)
        t1 = time.monotonic()
        while time.monotonic() - t1 < 300:
            m = scrape(port)
            samples.append(
                (
                    time.monotonic() - t1,
                    rss_bytes(proc.pid),
                    metric_sum(m, "ecg_consumer_lag"),
                    metric_sum(m, "ecg_messages_consumed_total"),
                )
            )
            if samples[-1][3] >= result.sent and samples[-1][2] == 0:
                break
            time.sleep(0.25)
        drain_s = samples[-1][0]
        out = repaired_or_dead(cfg, backlog.keys(), timeout_s=60, idle_s=1.0)
    finally:
        stop_all([proc])

    rss = [r for _, r, _, _ in samples]
    lags = [lag for _, _, lag, _ in samples]
    mb = 1 / 2**20
    print(
        f"backpressure: burst of {result.sent} beats ({backlog.bytes * mb:.0f} MB) in "
        f"{burst_s:.1f} s; one worker drained it in {drain_s:.1f} s "
        f"({result.sent / drain_s:.0f} beats/s); lag max {max(lags):.0f}, final {lags[-1]:.0f}; "
        f"RSS start {rss[0] * mb:.0f} MB, peak {max(rss) * mb:.0f} MB, end {rss[-1] * mb:.0f} MB "
        f"({len(samples)} samples)"
    )
    print(
        "  (s, RSS MB, lag, consumed): "
        + " ".join(f"({t:.1f}, {r * mb:.0f}, {lag:.0f}, {n:.0f})" for t, r, lag, n in samples[::4])
    )
    # The lag metric shows the backlog while the first third of it is being worked off (it
    # is known per partition once that partition has been fetched), and ends at 0.
    early = [lag for _, _, lag, n in samples if n < result.sent / 3]
    assert max(early) > result.sent / 2
    assert lags[-1] == 0 and samples[-1][3] >= result.sent
    assert out.keys() == backlog.keys()
    # Memory: bounded, and flat while the backlog drains from full to empty (not tied to the
    # backlog or to the beats processed). The growth over the start is the fixed working set
    # of a full batch (model activations, one fetch of at most partitions x FETCH_BYTES).
    assert max(rss) < 2**30
    assert max(rss) - rss[0] < 200 * 2**20
    half = len(samples) // 2
    assert max(rss[half:]) <= max(rss[:half]) + 32 * 2**20


# --------------------------------------------------------------------------- broker outage


class S3Emulator:
    """moto_server on a loopback port with the bucket `tansu` (durable broker storage)."""

    def __init__(self, log_path: Path):
        binary = Path(sys.executable).parent / "moto_server"
        require(binary.exists(), "moto[server] is not installed (moto_server missing)")
        self.port = free_port()
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, timeout=60)
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/tansu", method="PUT")
        assert urllib.request.urlopen(request, timeout=10).status == 200

    @property
    def env(self) -> dict:
        return {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT": f"http://127.0.0.1:{self.port}",
            "AWS_ALLOW_HTTP": "true",
        }

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
        self.log.close()


@pytest.mark.slow
def test_broker_outage(data_dir, checkpoint, tmp_path):
    """The broker (durable S3 storage) is down for 22 s mid-stream: the worker and the
    simulator keep running, report the outage in metrics and logs, and after the restart every
    acknowledged beat is repaired; nothing the simulator could not send is lost."""
    s3 = S3Emulator(tmp_path / "moto.log")
    port = free_port()

    def start_broker() -> EmbeddedBroker:
        return EmbeddedBroker(
            port=port, storage="s3://tansu/", env=s3.env, log_path=tmp_path / "broker.log"
        ).start()

    broker = start_broker()
    sim_port = free_port()
    cfg = unique_topics_config(
        broker.bootstrap,
        data_dir,
        "simulator.patients=8",
        "simulator.rate=60",
        "simulator.beats=3000",
        "simulator.seed=3",
        f"simulator.metrics_port={sim_port}",
        "metrics.host=127.0.0.1",
        # On S3 storage every produce is an object and every fetch a listing: fewer, larger
        # requests keep the emulator from becoming the bottleneck.
        "kafka.fetch_max_wait_ms=500",
        "worker.max_wait_ms=100",
        "kafka.linger_ms=50",
        ONE_THREAD,
        *MIXED_DROPOUT,
    )
    procs = []
    try:
        ensure_topics(cfg.kafka, cfg.topics)
        worker, worker_port = start_worker(cfg, tmp_path, "w0")
        procs.append(worker)
        wait_for_metrics(worker_port, worker)
        sim_cfg = write_config(cfg, tmp_path / "sim.yaml")
        sim = start_process(["simulate"], sim_cfg, tmp_path / "sim.log")
        procs.append(sim)
        wait_for_metrics(sim_port, sim)

        # Beats flow end to end before the outage.
        deadline = time.monotonic() + 90
        before = {}
        while time.monotonic() < deadline:
            before = try_scrape(worker_port) or {}
            if metric_sum(before, "ecg_beats_produced_total") >= 300:
                break
            time.sleep(0.5)
        assert metric_sum(before, "ecg_beats_produced_total") >= 300
        sim_before = try_scrape(sim_port)

        broker.stop()
        t_down = time.monotonic()
        during = []  # (seconds into the outage, worker metrics, simulator metrics)
        while time.monotonic() - t_down < OUTAGE_S:
            time.sleep(1.0)
            assert worker.poll() is None, "the worker exited during the outage"
            assert sim.poll() is None, "the simulator exited during the outage"
            during.append(
                (time.monotonic() - t_down, try_scrape(worker_port), try_scrape(sim_port))
            )
        produced_down = metric_sum(during[-1][1], "ecg_beats_produced_total")

        backlog = metric_sum(during[-1][2], "ecg_sim_beats_sent_total")  # sent up to now
        broker = start_broker()
        t_up = time.monotonic()
        # Recovery: the first new repaired beat, then the backlog drained (lag back to 0 for
        # everything produced before and during the outage).
        first_new = drained = None
        while time.monotonic() - t_up < 180 and drained is None:
            assert worker.poll() is None, "the worker exited after the outage"
            w = try_scrape(worker_port) or {}
            now = time.monotonic() - t_up
            if first_new is None and metric_sum(w, "ecg_beats_produced_total") > produced_down:
                first_new = now
            if metric_sum(w, "ecg_messages_consumed_total") >= backlog:
                drained = now
            time.sleep(0.2)
        assert first_new is not None, "no repaired beat within 180 s of the broker's return"
        assert drained is not None, "the worker never caught up after the outage"

        assert sim.wait(timeout=180) == 0, "the simulator failed"
        summary = json.loads(
            next(
                line
                for line in reversed((tmp_path / "sim.log").read_text().splitlines())
                if line.startswith("{")
            )
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            w = scrape(worker_port)
            if (
                metric_sum(w, "ecg_consumer_lag") == 0
                and metric_sum(w, "ecg_messages_consumed_total") >= summary["acked"]
            ):
                break
            time.sleep(0.5)
        after = scrape(worker_port)
        stop_all(procs)
        raw = raw_keys(cfg, summary["sent"])
        out = repaired_or_dead(cfg, raw, timeout_s=60)
    finally:
        stop_all(procs)
        broker.stop()
        s3.stop()

    # The outage as the metrics showed it, sampled once a second.
    for t, w, s in during:
        print(
            f"outage t={t:4.1f}s worker connected={w['ecg_kafka_connected']:.0f} "
            f"errors={metric_sum(w, 'ecg_kafka_errors_total'):.0f} | simulator "
            f"connected={s['ecg_kafka_connected']:.0f} "
            f"errors={metric_sum(s, 'ecg_kafka_errors_total'):.0f} "
            f"buffered={s['ecg_sim_buffered_beats']:.0f}"
        )
    lost = raw - out.keys()
    print(
        f"broker outage: {OUTAGE_S} s; simulator sent {summary['sent']}, acked "
        f"{summary['acked']}, dropped {summary['dropped']}; raw topic {len(raw)} unique beats; "
        f"repaired+DLQ {len(out.keys())} unique, lost {len(lost)}, duplicates "
        f"{out.duplicates()}; recovery after the broker's return: first repaired beat "
        f"{first_new:.1f} s, outage backlog ({backlog:.0f} beats sent by then) drained "
        f"{drained:.1f} s"
    )

    # Neither process died, and both showed the outage in their metrics.
    for name, samples, base in (
        ("worker", [w for _, w, _ in during], before),
        ("simulator", [s for _, _, s in during], sim_before),
    ):
        assert all(s is not None for s in samples), f"{name} metrics unreachable in the outage"
        assert any(s["ecg_kafka_connected"] == 0 for s in samples), name
        assert metric_sum(samples[-1], "ecg_kafka_errors_total") > metric_sum(
            base, "ecg_kafka_errors_total"
        ), name
    assert after["ecg_kafka_connected"] == 1
    worker_log = (tmp_path / "w0.log").read_text()
    sim_log = (tmp_path / "sim.log").read_text()
    # The worker notices the outage polling, publishing or committing, whichever it was doing.
    assert re.search(
        "no connection to Kafka|not acknowledged yet|publish failed|commit failed", worker_log
    )
    assert "Kafka unavailable" in sim_log and "Kafka reachable again" in sim_log

    # Nothing lost: every beat the simulator sent was acknowledged and is on the raw topic,
    # and every raw beat was repaired (or dead-lettered).
    assert summary["dropped"] == 0
    assert summary["acked"] == summary["sent"]
    assert len(raw) == summary["sent"]
    assert not lost, f"{len(lost)} raw beats never repaired, e.g. {sorted(lost)[:5]}"
    assert out.keys() == raw
