"""`ecg-stream tail`: follow a topic and print one line per message; optionally plot beats.

A minimal reference subscriber for monitoring systems: it reads every partition without
joining a consumer group, and drops redelivered copies (the pipeline delivers at least once)
with the subscriber kit's bounded de-duplication, as every subscriber should.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import orjson

from stream.config import Config
from stream.kafka import assign_all, make_consumer, require_topic
from stream.subscriber import Deduplicator

# The topics the workers publish at least once (raw and dlq copies are shown as they are).
DEDUPLICATED = ("repaired", "events", "alerts")


def describe(topic_kind: str, msg: dict) -> str:
    """One human-readable line for a message of the given topic kind."""
    if topic_kind == "repaired":
        cls = msg.get("beat_class") or {}
        anomaly = msg.get("anomaly") or {}
        flag = " ANOMALY" if anomaly.get("flag") else ""
        label = f"{cls['label']} {cls['confidence']:.2f}" if cls else "-"
        return (
            f"{msg['patient_id']} seq={msg['seq']} {msg['status']:<13} "
            f"imputed={sum(msg['imputed_mask']):>3}/{len(msg['samples']):<3} "
            f"class={label}{flag}"
        )
    if topic_kind == "alerts":
        return f"{msg['patient_id']} seq={msg['seq']} {msg['type']} {orjson.dumps(msg['detail'])}"
    if topic_kind == "events":
        rate = msg.get("heart_rate_bpm")
        return (
            f"{msg['patient_id']} {msg['kind']:<6} {msg['type']} ({msg['severity']}) "
            f"seq {msg['first_seq']}-{msg['last_seq']} beats={msg['beat_count']} "
            f"{msg['end_time'] - msg['start_time']:.1f} s "
            f"rate={'-' if rate is None else f'{rate:.0f}/min'} conf={msg['confidence']:.2f}"
        )
    if topic_kind == "dlq":
        return f"offset={msg['partition']}:{msg['offset']} {msg['reason']}: {msg['detail']}"
    return f"{msg.get('patient_id')} seq={msg.get('seq')}"


def plot_beat(msg: dict, path: Path) -> None:
    """A PNG of a repaired beat: observed samples in blue, imputed ones in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = np.array([np.nan if v is None else v for v in msg["samples"]], float)
    imputed = np.asarray(msg["imputed_mask"], bool)
    t = np.arange(len(samples)) / msg["fs"]
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.plot(t, np.where(imputed, np.nan, samples), color="tab:blue", label="observed")
    ax.plot(t, np.where(imputed, samples, np.nan), color="tab:red", lw=2, label="imputed")
    cls = (msg.get("beat_class") or {}).get("label", "-")
    ax.set_title(
        f"{msg['patient_id']} seq {msg['seq']} - {msg['status']} - class {cls}", fontsize=9
    )
    ax.set_xlabel("s")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def tail(
    cfg: Config,
    topic_kind: str,
    from_beginning: bool,
    limit: int,
    plot_dir: str | None,
    as_json: bool,
    stop: threading.Event,
    out=print,
) -> int:
    """Follow a topic until stopped or `limit` messages; returns the number printed."""
    topic = getattr(cfg.topics, topic_kind)
    # A reader must not create the topic it looks for (a broker with auto-creation would).
    consumer = make_consumer(cfg.kafka, None, allow_auto_create_topics=False)
    recent = Deduplicator()
    count = 0
    try:
        require_topic(consumer, topic)
        assign_all(consumer, topic, from_beginning)
        if plot_dir:
            Path(plot_dir).mkdir(parents=True, exist_ok=True)
        while not stop.is_set() and (not limit or count < limit):
            for records in consumer.poll(timeout_ms=500).values():
                for rec in records:
                    msg = orjson.loads(rec.value)
                    if topic_kind in DEDUPLICATED and recent.seen(msg):
                        continue
                    out(rec.value.decode() if as_json else describe(topic_kind, msg))
                    if plot_dir and topic_kind == "repaired":
                        plot_beat(msg, Path(plot_dir) / f"{msg['patient_id']}-{msg['seq']}.png")
                    count += 1
                    if limit and count >= limit:
                        return count
    finally:
        consumer.close()
    return count
