"""A worker's per-patient state: device resets, and state bounded by idle time and a cap."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np

from stream import messages
from stream.config import load_config
from stream.engine import Engine
from stream.messages import RawBeat
from stream.metrics import WorkerMetrics
from stream.processor import Processor
from stream.state import PatientRegistry
from tests.helpers import metric_sum, scrape


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def beat(patient: str, seq: int, ts: float, session: str | None = None) -> RawBeat:
    samples = np.full(100, 0.5)
    return RawBeat(patient, seq, ts, None, samples, np.zeros(100, bool), [], session)


def test_a_reboot_restarts_the_sequence_and_keeps_the_template_slot():
    registry = PatientRegistry()
    first = [registry.admit(0, beat("p", s, 10.0 + s)) for s in range(60)]
    again = registry.admit(0, beat("p", 1, 100.0))  # seq 1-60 again, the clock moved on
    assert again.reset and not again.new and again.slot == first[0].slot
    assert again.rr_s is None and again.lost == 0
    follow = registry.admit(0, beat("p", 2, 100.8))
    assert not follow.reset and follow.rr_s is not None


def test_a_new_session_id_is_a_reset_even_when_the_clock_starts_over():
    registry = PatientRegistry()
    registry.admit(0, beat("p", 5, 2000.0, "boot1"))
    assert registry.admit(0, beat("p", 6, 2001.0, "boot1")).reset is False
    reset = registry.admit(0, beat("p", 0, 3.0, "boot2"))  # its clock restarted too
    assert reset.reset
    assert registry.admit(0, beat("p", 1, 4.0, "boot2")).reset is False


def test_a_small_step_back_is_a_duplicate_not_a_reset():
    import pytest

    from stream.messages import InvalidMessage

    registry = PatientRegistry()
    registry.admit(0, beat("p", 500, 1000.0))
    with pytest.raises(InvalidMessage, match="duplicate_seq"):
        registry.admit(0, beat("p", 450, 1001.0))  # 50 back: neither far nor half
    assert registry.admit(0, beat("p", 400, 1002.0)).reset  # RESET_SEQ_DROP = 100 back
    with pytest.raises(InvalidMessage, match="duplicate_seq"):
        registry.admit(0, beat("p", 400, 1003.0))  # the new numbering's own duplicate


def test_warm_up_skips_what_the_first_owner_sent_to_the_dlq(checkpoint):
    """Re-reading a partition's earlier beats admits only what the worker would have: a
    far-future timestamp in them must not move the patient's clock ahead of its real beats."""
    cfg = load_config(env={})
    engine = Engine.load(checkpoint, threads=1, max_batch=8)
    processor = Processor(cfg, engine, WorkerMetrics(), "w-test")
    now = time.time()

    def record(offset: int, seq: int, ts: float) -> SimpleNamespace:
        raw = messages.raw_beat("p", seq, ts, np.full(100, 0.5), np.zeros(100, bool))
        return SimpleNamespace(
            partition=0, topic="raw", offset=offset, key=b"p", value=messages.dumps(raw)
        )

    try:
        earlier = [record(0, 1, now), record(1, 2, now + 9e6), record(2, 2, now + 1.0)]
        assert processor.warm_up(earlier) == 2
        batch = processor.prepare([record(3, 3, now + 2.0)])
    finally:
        engine.close()
    assert [topic for topic, _, _ in batch.out.messages] == [], "the next real beat was refused"
    assert len(batch.accepted) == 1 and batch.accepted[0].admitted.rr_s is not None


def test_the_least_recently_seen_patient_goes_first_over_the_cap():
    registry = PatientRegistry(max_patients=3)
    for i in range(3):
        registry.admit(i % 2, beat(f"p{i}", 0, 1.0))
    registry.admit(0, beat("p0", 1, 2.0))  # p0 is recent again
    registry.admit(1, beat("p3", 0, 1.0))
    assert registry.evict() == [(1, "p1", "cap")]
    assert registry.patient_count() == 3
    fresh = registry.admit(0, beat("p4", 0, 1.0))
    assert fresh.new and fresh.slot == 1  # p1's slot, reused (the model is told to forget it)
    assert registry.evict() == [(0, "p2", "cap")]


def test_idle_patients_are_forgotten_and_come_back_fresh():
    clock = Clock()
    registry = PatientRegistry(idle_s=60.0, clock=clock)
    registry.admit(0, beat("a", 10, 100.0))
    clock.now = 30.0
    registry.admit(0, beat("b", 0, 100.0))
    clock.now = 70.0
    assert registry.evict() == [(0, "a", "idle")]
    clock.now = 95.0
    assert registry.evict() == [(0, "b", "idle")]
    assert registry.patient_count() == 0 and registry.seen == {}
    back = registry.admit(0, beat("a", 11, 200.0))
    assert back.new and back.lost == 0  # no history: nothing to compare its seq with


def test_a_revoked_partition_leaves_the_recency_order_too():
    registry = PatientRegistry(max_patients=10)
    registry.admit(0, beat("a", 0, 1.0))
    registry.admit(1, beat("b", 0, 1.0))
    registry.drop_partitions([0])
    assert list(registry.seen) == [(1, "b")]


def tree_rss(pid: int) -> int:
    """RSS of a process and its children (the worker's model process keeps the templates)."""
    from pathlib import Path

    from tests.helpers import rss_bytes

    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return rss_bytes(pid) + sum(rss_bytes(int(c)) for c in children)


def test_a_worker_holds_at_most_max_patients_and_forgets_idle_ones(pipeline_config, tmp_path):
    """6,000 patients with a few beats each through a worker capped at 1,000: the memory
    beyond the cap stays flat, evictions are counted, and idle patients are forgotten."""
    from stream import messages
    from stream.kafka import ensure_topics, make_producer
    from tests.helpers import consumed, start_worker, stop_workers, wait_until

    cfg = pipeline_config("worker.max_patients=1000", "worker.patient_idle_s=15")
    ensure_topics(cfg.kafka, cfg.topics)
    proc, port = start_worker(cfg, tmp_path, "w0")
    producer = make_producer(cfg.kafka)
    samples = [0.5 + 0.3 * np.sin(i / 9) for i in range(120)]

    def send(first: int, last: int) -> None:
        for seq in range(3):
            for i in range(first, last):
                msg = messages.raw_beat(f"q{i}", seq, 1000.0 + seq, samples, [False] * 120)
                producer.send(cfg.topics.raw, key=f"q{i}".encode(), value=messages.dumps(msg))
        producer.flush()

    try:
        from tests.helpers import wait_for_metrics

        wait_for_metrics(port, proc)
        send(0, 1000)
        wait_until(lambda: consumed(port) >= 3000, 120, "the first 1,000 patients consumed")
        at_cap = tree_rss(proc.pid)
        send(1000, 6000)
        wait_until(lambda: consumed(port) >= 18000, 240, "all 6,000 patients consumed")
        beyond = tree_rss(proc.pid)
        samples_now = scrape(port)

        # The gauge drops when the patients are forgotten; their eviction counts land once the
        # tombstones are flushed, a moment later: wait for both.
        def forgotten() -> bool:
            now = scrape(port)
            return (
                metric_sum(now, "ecg_patients_tracked") == 0
                and now.get("ecg_patients_evicted_total{reason=idle}", 0) >= 1000
            )

        wait_until(forgotten, 90, "idle patients forgotten (and counted) after patient_idle_s")
        idle = scrape(port)
        send(6000, 7000)  # a new wave of patients after the others went silent
        wait_until(lambda: consumed(port) >= 21000, 120, "the new wave consumed")
        again = tree_rss(proc.pid)
    finally:
        producer.close()
        stop_workers([(proc, port)])

    growth_mb_per_1000 = (beyond - at_cap) / 2**20 / 5
    print(
        f"RSS at the cap {at_cap / 2**20:.0f} MB, +{growth_mb_per_1000:.1f} MB per 1,000 "
        f"beyond; after the idle ones were forgotten and 1,000 new came {again / 2**20:.0f} MB"
    )
    assert growth_mb_per_1000 < 10
    # The forgotten patients' memory is reused (RSS does not shrink: the allocators keep it):
    # 1,000 new patients grow it by far less than the 60 MB they would hold fresh.
    assert again - beyond < 25 * 2**20
    assert samples_now["ecg_patients_tracked"] <= 1000
    assert samples_now["ecg_patients_evicted_total{reason=cap}"] >= 5000
    # Beats go out a seq at a time over all patients, so a patient evicted at the cap comes
    # back fresh with its next beat: more evictions than patients.
    assert idle["ecg_patients_evicted_total{reason=idle}"] >= 1000


def test_patients_moved_to_a_new_worker_are_not_served_cold(pipeline_config, tmp_path):
    """kill -9 the only worker mid-stream; its replacement re-reads the partitions' recent raw
    beats first (worker.warmup_records), so the moved patients' next 40 repairs are as good
    as the steady state, against the truth topic, and their RR is known at once."""
    import signal

    from stream.kafka import ensure_topics
    from tests.helpers import (
        consumed,
        decode,
        in_thread,
        joined,
        read_topic,
        run_simulator,
        start_worker,
        stop_workers,
        wait_for_metrics,
        wait_until,
    )

    cfg = pipeline_config(
        "simulator.patients=24",
        "simulator.rate=300",
        "simulator.beats=6000",
        "simulator.truth=true",
        "simulator.seed=5",
        "simulator.dropout.gap_prob=0.6",
        "simulator.dropout.lost_beat_prob=0",
    )
    ensure_topics(cfg.kafka, cfg.topics)
    first, port = start_worker(cfg, tmp_path, "w0")
    replacement = None
    try:
        wait_for_metrics(port, first)
        sim_thread, sim = in_thread(run_simulator, cfg)
        wait_until(lambda: consumed(port) >= 24 * 80, 120, "80 beats per patient before the kill")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        replacement = start_worker(cfg, tmp_path, "w1")
        wait_for_metrics(replacement[1], replacement[0])
        result = joined(sim_thread, sim, timeout_s=120)
        repaired = decode(read_topic(cfg, cfg.topics.repaired, expected=result.sent))
        truth = {(m["patient_id"], m["seq"]): m for m in decode(read_topic(cfg, cfg.topics.truth))}
        after_restart = scrape(replacement[1])
        warmed = metric_sum(after_restart, "ecg_warmup_beats_total")
    finally:
        stop_workers([(first, port)] + ([replacement] if replacement else []))

    by_patient: dict[str, list[dict]] = {}
    for m in sorted(repaired, key=lambda m: (m["patient_id"], m["seq"], m["worker_id"])):
        seen = by_patient.setdefault(m["patient_id"], [])
        if not seen or seen[-1]["seq"] != m["seq"]:
            seen.append(m)  # the first copy of each beat (w0's, where both published it)
    steady, moved, rr_known = [], [], []
    for beats in by_patient.values():
        after = [m for m in beats if m["worker_id"] == "w1"]
        steady += [m for m in beats if m["worker_id"] == "w0" and m["seq"] >= 40]
        moved += after[:40]
        rr_known.append(after[0]["rr_interval_s"] is not None)

    def rmse(beats) -> float:
        errors = []
        for m in beats:
            mask = np.asarray(m["imputed_mask"], bool)
            if m["status"] == "repaired" and mask.any():
                true = np.asarray(truth[(m["patient_id"], m["seq"])]["samples"], float)
                errors.append((np.asarray(m["samples"], float)[mask] - true[mask]) ** 2)
        return float(np.sqrt(np.concatenate(errors).mean()))

    ratio = rmse(moved) / rmse(steady)
    per_partition = (
        after_restart["ecg_warmup_seconds_sum"] / after_restart["ecg_warmup_seconds_count"]
    )
    print(
        f"warm-up {warmed:.0f} beats, {per_partition:.2f} s per partition; moved patients' "
        f"next 40 beats RMSE {ratio:.3f}x steady"
    )
    assert warmed > 0 and len(moved) >= 20 * 40
    assert all(rr_known), "a moved patient's first beat had no RR"
    assert ratio <= 1.10
