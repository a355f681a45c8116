"""Offline evaluation of the rhythm episodes against the MIT-BIH rhythm annotations (DS2).

Each DS2 record is replayed as one patient through what the stream runs: the simulator's
dropout (or none), the DS1 model with the patient's causal context, and the rhythm stage
(`models.episodes.PatientRhythm`, the same class the worker uses). The detected episodes are
compared with the reference, following the rules of PhysioNet's `epicmp` and `rxr` (AAMI
EC57): an annotated episode is detected when a detected episode of a matching type overlaps
it (episode sensitivity), a detected episode is true when it overlaps an annotated one of a
matching type (episode positive predictivity), and for atrial fibrillation the overlapping
time is counted too (duration Se / +P). Ventricular runs are also scored against the runs of
>= 3 V in the beat annotations, as `rxr` does. Today's per-beat alerts are counted on the
same replay, so the two message rates compare like for like.

Run as `ecg-stream evaluate-events --out DIR` (report.json and report.md).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from models import data as D
from models.episodes import Beat, Episode, EpisodeConfig, PatientRhythm
from models.model import load_checkpoint
from models.train import beat_context

# MIT-BIH rhythm annotation -> the detected types that count as finding it
REFERENCE_TYPES = {
    "(VT": ("ventricular_run", "ventricular_tachycardia"),
    "(B": ("ventricular_bigeminy",),
    "(T": ("ventricular_trigeminy",),
    "(AFIB": ("atrial_fibrillation",),
    "(SVTA": ("svta",),
    "(SBR": ("bradycardia",),
}
REFERENCE_NAMES = {
    "(VT": "ventricular tachycardia",
    "(B": "ventricular bigeminy",
    "(T": "ventricular trigeminy",
    "(AFIB": "atrial fibrillation",
    "(SVTA": "supraventricular tachyarrhythmia",
    "(SBR": "sinus bradycardia",
    "runs": "ventricular runs >= 3 V (beat labels, EC57)",
}
RUN_TYPES = ("ventricular_run", "ventricular_tachycardia")
UNRECOVERABLE_FRACTION = 0.6  # the worker's default (worker.unrecoverable_fraction)
ALERT_PROBABILITY = 0.5  # the worker's default for per-beat arrhythmia alerts
BATCH = 1024


@dataclass
class Replay:
    """One record through the stream's stages."""

    record: str
    hours: float
    episodes: list[Episode]
    events: int
    beat_alerts: dict[str, int]


def rhythm_segments(record: str, data_dir: Path) -> list[tuple[str, float, float]]:
    """(rhythm, start s, end s) of a record's rhythm annotations (aux_note of '+')."""
    import wfdb

    ann = wfdb.rdann(str(data_dir / record), "atr")
    length = wfdb.rdheader(str(data_dir / record)).sig_len
    marks = [
        (int(s), n.strip("\x00"))
        for s, sym, n in zip(ann.sample, ann.symbol, ann.aux_note)
        if sym == "+"
    ]
    fs = float(ann.fs or D.FS_RAW)
    ends = [s for s, _ in marks[1:]] + [length]
    return [(n, s / fs, e / fs) for (s, n), e in zip(marks, ends)]


def label_runs(times: np.ndarray, labels: np.ndarray, cls: int, least: int) -> list[tuple]:
    """(start, end) of runs of >= `least` consecutive beats of class `cls`."""
    runs, start = [], None
    for i, is_cls in enumerate(np.r_[labels == cls, False]):
        if is_cls and start is None:
            start = i
        elif not is_cls and start is not None:
            if i - start >= least:
                runs.append((float(times[start]), float(times[i - 1])))
            start = None
    return runs


def classify(net, beats: D.Beats, missing: np.ndarray, after_gap: np.ndarray):
    """Class probabilities and anomaly scores with each patient's causal context."""
    from models.model import repair

    ctx = beat_context(net.config.template, beats, missing, after_gap=after_gap)
    probs, scores = [], []
    for s in range(0, len(beats), BATCH):
        part = slice(s, s + BATCH)
        out = repair(
            net,
            beats.samples[part],
            missing[part],
            ctx.template[part],
            beats.length[part],
            ctx.usual[part],
            ctx.features[part],
        )
        probs.append(out.probabilities)
        scores.append(out.anomaly_score)
    return np.concatenate(probs), np.concatenate(scores)


def replay(
    record: str, beats: D.Beats, probs, scores, unrecoverable, seqs, threshold, cfg
) -> Replay:
    """Feed one record's beats to the rhythm stage; count events and per-beat alerts."""
    rhythm = PatientRhythm(record, cfg)
    episodes: list[Episode] = []
    events = 0
    alerts = dict.fromkeys(("arrhythmia", "anomaly", "unrecoverable", "lost_beats"), 0)
    labels = probs.argmax(1)
    previous = None
    for i in range(len(beats)):
        seq = int(seqs[i])
        if previous is not None and seq > previous + 1:
            alerts["lost_beats"] += 1
        previous = seq
        if unrecoverable[i]:
            beat = Beat(seq, float(beats.time[i]), None)
            alerts["unrecoverable"] += 1
        else:
            label = D.AAMI_CLASSES[labels[i]]
            confidence = float(probs[i, labels[i]])
            flagged = bool(scores[i] > threshold)
            beat = Beat(seq, float(beats.time[i]), label, confidence)
            alerts["arrhythmia"] += label != "N" and confidence >= ALERT_PROBABILITY
            alerts["anomaly"] += flagged
        for event in rhythm.observe(beat):
            events += 1
            if event.kind == "close":
                episodes.append(event.episode)
    for ep in rhythm.open.values():  # still open when the record ends
        episodes.append(ep)
    hours = float(beats.time[-1] - beats.time[0]) / 3600 if len(beats) else 0.0
    return Replay(record, hours, episodes, events, alerts)


def run_condition(net, meta, ds2: D.Beats, masks, cfg) -> list[Replay]:
    """Every DS2 record through the model and the rhythm stage, with (missing, lost) masks."""
    missing, lost = masks
    replays = []
    for record in D.DS2:
        rows = np.flatnonzero(ds2.record == record)
        kept = rows[~lost[rows]]
        seqs = np.flatnonzero(~lost[rows])  # a record's beat index is its seq
        after_gap = np.r_[False, np.diff(seqs) > 1]
        beats = ds2.subset(kept)
        probs, scores = classify(net, beats, missing[kept], after_gap)
        fraction = missing[kept].sum(1) / np.maximum(beats.length, 1)
        replays.append(
            replay(
                record,
                beats,
                probs,
                scores,
                fraction > UNRECOVERABLE_FRACTION,
                seqs,
                meta["anomaly_threshold"],
                cfg,
            )
        )
    return replays


def _overlaps(a0, a1, b0, b1) -> bool:
    return a0 <= b1 and b0 <= a1


def _union_length(spans) -> float:
    total, end = 0.0, -np.inf
    for s, e in sorted(spans):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def _intersection_length(a, b) -> float:
    return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)


def _merge(spans):
    merged: list[list[float]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [tuple(m) for m in merged]


def episode_scores(reference: dict, detected: dict) -> dict:
    """Episode Se / +P from per-record lists of (start, end) spans."""
    found = sum(
        any(_overlaps(s, e, ds, de) for ds, de in detected.get(r, []))
        for r, spans in reference.items()
        for s, e in spans
    )
    true = sum(
        any(_overlaps(s, e, rs, re) for rs, re in reference.get(r, []))
        for r, spans in detected.items()
        for s, e in spans
    )
    n_ref = sum(map(len, reference.values()))
    n_det = sum(map(len, detected.values()))
    return {
        "annotated": n_ref,
        "annotated_records": sum(bool(v) for v in reference.values()),
        "detected": n_det,
        "sensitivity": found / n_ref if n_ref else None,
        "ppv": true / n_det if n_det else None,
    }


def duration_scores(reference: dict, detected: dict) -> dict:
    ref = {r: _merge(v) for r, v in reference.items()}
    det = {r: _merge(v) for r, v in detected.items()}
    ref_s = sum(_union_length(v) for v in ref.values())
    det_s = sum(_union_length(v) for v in det.values())
    both = sum(_intersection_length(ref.get(r, []), v) for r, v in det.items())
    return {
        "annotated_min": ref_s / 60,
        "detected_min": det_s / 60,
        "sensitivity": both / ref_s if ref_s else None,
        "ppv": both / det_s if det_s else None,
    }


def score(replays: list[Replay], reference: dict, runs: dict, kept_alerts) -> dict:
    """Per-type episode statistics, AF duration statistics and message rates."""
    detected: dict[str, dict[str, list]] = {}
    for rp in replays:
        for ep in rp.episodes:
            detected.setdefault(ep.type, {}).setdefault(rp.record, [])
            detected[ep.type][rp.record].append((ep.start_time, ep.end_time))

    def of_types(types):
        out: dict[str, list] = {}
        for t in types:
            for r, spans in detected.get(t, {}).items():
                out.setdefault(r, []).extend(spans)
        return out

    types = {}
    for rhythm, matching in REFERENCE_TYPES.items():
        ref = {r: spans.get(rhythm, []) for r, spans in reference.items()}
        types[rhythm] = {"name": REFERENCE_NAMES[rhythm], **episode_scores(ref, of_types(matching))}
    types["runs"] = {"name": REFERENCE_NAMES["runs"], **episode_scores(runs, of_types(RUN_TYPES))}
    af_ref = {r: spans.get("(AFIB", []) for r, spans in reference.items()}
    afl_ref = {r: spans.get("(AFL", []) for r, spans in reference.items()}
    af_det = of_types(["atrial_fibrillation"])
    af = duration_scores(af_ref, af_det)
    af["detected_in_flutter_min"] = (
        sum(_intersection_length(_merge(afl_ref.get(r, [])), _merge(v)) for r, v in af_det.items())
        / 60
    )
    hours = sum(rp.hours for rp in replays)
    events = sum(rp.events for rp in replays)
    alerts = {k: sum(rp.beat_alerts[k] for rp in replays) for k in replays[0].beat_alerts}
    per_beat = sum(alerts.values())
    kept = sum(alerts[k] for k in kept_alerts)
    counts = {t: sum(len(v) for v in d.values()) for t, d in sorted(detected.items())}
    return {
        "types": types,
        "atrial_fibrillation_duration": af,
        "episodes_by_type": counts,
        "rates": {
            "patient_hours": hours,
            "events": events,
            "events_per_patient_hour": events / hours,
            "episodes_per_patient_hour": sum(counts.values()) / hours,
            "per_beat_alerts": alerts,
            "per_beat_alerts_per_patient_hour": per_beat / hours,
            "alerts_to_events": per_beat / events if events else None,
            "kept_alerts": list(kept_alerts),
            "kept_alerts_per_patient_hour": kept / hours,
        },
    }


def evaluate_events(
    out_dir, data_dir, checkpoint, cfg: EpisodeConfig, dropout, kept_alerts=("lost_beats",)
) -> dict:
    """Replay DS2 clean and with `dropout` (beats -> (missing, lost) masks: the simulator's
    dropout, passed in so that models/ stays free of the stream); write report.json and
    report.md; return the report. `kept_alerts`: the per-beat alert types still published
    beside the events (worker.beat_alerts)."""
    out, data_dir = Path(out_dir), Path(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    net, meta = load_checkpoint(checkpoint)
    ds2 = D.load_beats(D.DS2, data_dir)
    reference: dict[str, dict[str, list]] = {}
    for record in D.DS2:
        for rhythm, start, end in rhythm_segments(record, data_dir):
            reference.setdefault(record, {}).setdefault(rhythm, []).append((start, end))
    runs = {}
    for record in D.DS2:
        rows = ds2.record == record
        runs[record] = label_runs(ds2.time[rows], ds2.label[rows], D.AAMI_CLASSES.index("V"), 3)
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": f"ecg-stream evaluate-events --out {out_dir}",
        "model": {"path": str(checkpoint), "version": meta.get("version")},
        "config": asdict(cfg),
        "conditions": {},
    }
    clean = np.zeros(ds2.samples.shape, bool), np.zeros(len(ds2), bool)
    for condition, masks in (("clean", clean), ("dropout", dropout(ds2))):
        replays = run_condition(net, meta, ds2, masks, cfg)
        report["conditions"][condition] = score(replays, reference, runs, kept_alerts)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    return report


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def render_markdown(report: dict) -> str:
    lines = [
        "# Rhythm episodes on DS2 (MIT-BIH rhythm annotations)",
        "",
        f"Command: `{report['command']}`. Model {report['model']['version']}. Each DS2 "
        "record is replayed as one patient through the model and the rhythm stage "
        "(`models.episodes`), without dropout (clean) and with the simulator's default "
        "dropout (missing samples, 0.5% of beats lost).",
        "",
    ]
    for condition, c in report["conditions"].items():
        lines += [
            f"## {condition}",
            "",
            "| reference | annotated (records) | detected | episode Se | episode +P |",
            "|---|---:|---:|---:|---:|",
        ]
        for t in c["types"].values():
            lines.append(
                f"| {t['name']} | {t['annotated']} ({t['annotated_records']}) | {t['detected']} "
                f"| {_pct(t['sensitivity'])} | {_pct(t['ppv'])} |"
            )
        af = c["atrial_fibrillation_duration"]
        r = c["rates"]
        alerts = ", ".join(f"{k} {v}" for k, v in r["per_beat_alerts"].items())
        lines += [
            "",
            f"Atrial fibrillation duration: {af['annotated_min']:.1f} min annotated, "
            f"{af['detected_min']:.1f} min detected, duration Se {_pct(af['sensitivity'])}, "
            f"+P {_pct(af['ppv'])} ({af['detected_in_flutter_min']:.1f} min of the detected "
            "time lies in annotated atrial flutter).",
            "",
            f"Messages over {r['patient_hours']:.1f} patient-hours: {r['events']} events "
            f"({r['events_per_patient_hour']:.1f} per patient-hour; "
            f"{r['episodes_per_patient_hour']:.1f} episodes) against "
            f"{r['per_beat_alerts_per_patient_hour']:.0f} per-beat alerts per patient-hour "
            f"({alerts}): {r['alerts_to_events']:.1f}x fewer. Per-beat alerts still published "
            f"({', '.join(r['kept_alerts'])}): {r['kept_alerts_per_patient_hour']:.1f} per "
            "patient-hour.",
            "",
            "Episodes by type: "
            + ", ".join(f"{k} {v}" for k, v in c["episodes_by_type"].items())
            + ".",
            "",
        ]
    return "\n".join(lines)
