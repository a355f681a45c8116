"""Live evaluation: join repaired beats with the truth topic and export repair quality.

For every imputed sample it adds the squared error of the model and of linear interpolation
(computed here from the same observed samples), so Grafana can show the model's live RMSE
next to the baseline's; it also counts classification hits. Only simulated streams have a
truth topic (simulator `--truth`).
"""

from __future__ import annotations

import collections
import logging
import threading

import numpy as np
import orjson

from models.baselines import linear_fill
from stream.config import Config
from stream.kafka import make_consumer
from stream.metrics import EvaluatorMetrics

log = logging.getLogger(__name__)


class LiveEvaluator:
    """Consumes repaired + truth topics in its own group and keeps running error sums."""

    def __init__(
        self,
        cfg: Config,
        metrics: EvaluatorMetrics | None = None,
        stop: threading.Event | None = None,
    ):
        self.cfg = cfg
        self.metrics = metrics or EvaluatorMetrics()
        self.stop = stop or threading.Event()
        self.pending: collections.OrderedDict = collections.OrderedDict()
        self.seen: set = set()
        self.sse = {"model": 0.0, "linear": 0.0}
        self.samples = 0
        self.correct = 0
        self.classified = 0

    def run(self) -> None:
        consumer = make_consumer(
            self.cfg.kafka, self.cfg.evaluator.group_id, enable_auto_commit=True
        )
        consumer.subscribe([self.cfg.topics.repaired, self.cfg.topics.truth])
        try:
            while not self.stop.is_set():
                for records in consumer.poll(timeout_ms=500).values():
                    for rec in records:
                        self.add(rec.topic, rec.value)
                self.metrics.kafka.ok()
        finally:
            consumer.close()

    def add(self, topic: str, value: bytes) -> None:
        """Take one message of either topic; score it once its other half has arrived."""
        try:
            msg = orjson.loads(value)
            key = (msg["patient_id"], msg["seq"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        if key in self.seen:
            return  # a redelivered duplicate: score each beat once
        side = "truth" if topic == self.cfg.topics.truth else "repaired"
        halves = self.pending.setdefault(key, {})
        halves[side] = msg
        if len(halves) == 2:
            del self.pending[key]
            self.seen.add(key)
            self.score(halves["repaired"], halves["truth"])
        while len(self.pending) > self.cfg.evaluator.max_pending:
            self.pending.popitem(last=False)  # e.g. lost beats never get a repaired half
        if len(self.seen) > 4 * self.cfg.evaluator.max_pending:
            self.seen.clear()
        self.metrics.pending.set(len(self.pending))

    def score(self, repaired: dict, truth: dict) -> None:
        """Add one matched beat's errors to the running sums and metrics."""
        m = self.metrics
        m.evaluated.inc()
        label = (repaired.get("beat_class") or {}).get("label")
        if label is not None:
            self.classified += 1
            self.correct += label == truth["label"]
            m.classified.inc()
            m.correct.inc(label == truth["label"])
            m.accuracy.set(self.correct / self.classified)
        imputed = np.asarray(repaired.get("imputed_mask") or [], bool)
        if not imputed.any():
            return
        clean = np.asarray(truth["samples"], float)
        model = np.asarray(repaired["samples"], float)
        observed = np.where(imputed, 0.0, model)
        linear = linear_fill(observed[None, :], imputed[None, :])[0]
        errors = {
            "model": model[imputed] - clean[imputed],
            "linear": linear[imputed] - clean[imputed],
        }
        self.samples += int(imputed.sum())
        m.masked_samples.inc(int(imputed.sum()))
        for method, err in errors.items():
            sse = float(np.sum(err**2))
            self.sse[method] += sse
            m.squared_error.labels(method).inc(sse)
            m.rmse.labels(method).set(self.rmse(method))

    def rmse(self, method: str) -> float:
        """Masked-sample RMSE so far."""
        return float(np.sqrt(self.sse[method] / self.samples)) if self.samples else float("nan")
