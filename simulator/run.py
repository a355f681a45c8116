"""The simulator loop: pace virtual patients' beats and publish them, keyed by patient.

Pacing: by the records' own beat times divided by `speed` (0 = as fast as possible), or at a
fixed total `rate` in beats/s. Deterministic for a given seed (the schedule and the dropout).

A beat's `timestamp` is its R-peak time on the patient's own clock: the simulation's start
plus the record time of the beat, so that the RR intervals a worker sees are the record's at
any speed (at speed 10 the patients' clocks run 10x faster than the wall clock).
"""

from __future__ import annotations

import gc
import heapq
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models import data as D
from simulator.patients import Dropout, SimBeat, build_patients
from simulator.publisher import BufferedPublisher
from stream import messages
from stream.config import Config, resolve_data_dirs
from stream.metrics import SimulatorMetrics

log = logging.getLogger(__name__)


@dataclass
class SimulationResult:
    sent: int = 0  # beats handed to Kafka (raw topic)
    skipped: int = 0  # beats deliberately lost (seq skipped)
    acked: int = 0
    dropped: int = 0
    patients: set = field(default_factory=set)


def load_noise(cfg: Config) -> np.ndarray | None:
    """The configured nstdb noise record at 125 Hz, or None."""
    name = cfg.simulator.dropout.noise
    if not name:
        return None
    dirs = resolve_data_dirs(cfg)
    nstdb = D.locate_database("nstdb", dirs.nstdb_dir, [name], cfg.data.download)
    return D.read_noise(name, nstdb)


def data_source(cfg: Config) -> tuple[list[str], Path | None]:
    """The records to replay and the MIT-BIH directory holding them (DataNotFoundError if
    unavailable). With `simulator.synthetic` the records are synthetic and there is none."""
    if cfg.simulator.synthetic:
        return [f"synthetic-{i}" for i in range(8)], None
    records = cfg.simulator.records or list(D.DS2)
    return records, D.locate_database("mitdb", cfg.data.mitdb_dir, records, cfg.data.download)


def encode(
    beat: SimBeat, timestamp: float, truth: bool, session: str | None = None
) -> tuple[bytes, bytes | None]:
    """(raw message, truth message or None when `truth` is off) bytes for one simulated beat.
    `session`: the run's device session id (a new run is a device reset for every patient)."""
    source = {"record": beat.record, "beat_index": beat.beat_index, "lead": "MLII"}
    raw = messages.dumps(
        messages.raw_beat(
            beat.patient_id,
            beat.seq,
            timestamp,
            beat.samples,
            beat.missing,
            sent_at=time.time(),
            source=source,
            session=session,
        )
    )
    if not truth:
        return raw, None
    truth_message = messages.dumps(
        messages.truth_beat(
            beat.patient_id,
            beat.seq,
            timestamp,
            beat.clean,
            beat.missing,
            beat.label,
            beat.lost,
            source,
        )
    )
    return raw, truth_message


def simulate(
    cfg: Config,
    producer,
    metrics: SimulatorMetrics | None = None,
    stop: threading.Event | None = None,
) -> SimulationResult:
    """Run the simulator until its duration/beat budget is spent or `stop` is set."""
    sim, topics = cfg.simulator, cfg.topics
    metrics = metrics or SimulatorMetrics()
    stop = stop or threading.Event()
    rng = np.random.default_rng(sim.seed)
    records, data_dir = data_source(cfg)
    patients = build_patients(sim.patients, records, data_dir)
    dropout = Dropout(sim.dropout, rng, load_noise(cfg))
    publisher = BufferedPublisher(producer, metrics, sim.max_buffered)
    result = SimulationResult()
    # Schedule: (due time in simulation seconds, patient index); patients start staggered.
    queue = [(float(rng.uniform(0, 1.0)), i) for i in range(len(patients))]
    heapq.heapify(queue)
    # The loaded records are long-lived: frozen, a full GC pass skips them and stays short
    # (unfrozen, its pauses, long with so many objects, held back sends and showed up as
    # pipeline latency).
    gc.freeze()
    started = time.monotonic()
    epoch = time.time()  # the patients' clocks start now and run in record time
    session = f"sim-{uuid.uuid4().hex[:12]}"  # each run is a fresh boot of every device
    last_ts: dict[int, float] = {}
    emitted = 0
    log.info(
        "simulating %d patients from %d %s records (speed %s, rate %s beats/s)",
        len(patients),
        len(records),
        "SYNTHETIC" if data_dir is None else "MIT-BIH",
        sim.speed,
        sim.rate,
    )
    while not stop.is_set():
        if sim.beats and emitted >= sim.beats:
            break
        if sim.duration_s and time.monotonic() - started >= sim.duration_s:
            break
        due, i = heapq.heappop(queue)
        patient = patients[i]
        index, rr_s = patient.next_beat()
        _pace(sim.speed, sim.rate, due, emitted, started, stop)
        beat = dropout.apply(patient, index, rr_s)
        timestamp = max(epoch + due, last_ts.get(i, 0.0) + 1e-6)
        last_ts[i] = timestamp
        raw, truth = encode(beat, timestamp, sim.truth, session)
        key = beat.patient_id.encode()
        if beat.lost:
            result.skipped += 1
            metrics.skipped.inc()
        else:
            publisher.send(topics.raw, key, raw)
            result.sent += 1
            result.patients.add(beat.patient_id)
        if sim.truth:
            publisher.send(topics.truth, key, truth, counted=False)
        emitted += 1
        heapq.heappush(queue, (due + rr_s, i))
    if not publisher.drain(timeout_s=60.0):
        log.error("%d beats still unacknowledged at exit", publisher.pending())
    result.acked = publisher.acked
    result.dropped = publisher.dropped
    log.info(
        "simulator done: %d beats sent, %d acknowledged, %d deliberately lost",
        result.sent,
        result.acked,
        result.skipped,
    )
    return result


def _pace(
    speed: float, rate: float, due: float, emitted: int, started: float, stop: threading.Event
) -> None:
    """Sleep until the next beat is due (record time / speed, or emitted / rate)."""
    if rate > 0:
        target = started + emitted / rate
    elif speed > 0:
        target = started + due / speed
    else:
        return
    delay = target - time.monotonic()
    if delay > 0:
        stop.wait(delay)
