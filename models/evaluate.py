"""Offline evaluation of the checkpoints: gap filling, AAMI beat classes and anomaly flags.

`evaluate` writes report.md, report.json and PNG figures into a directory; run it as
`ecg-stream evaluate --out DIR` (`stream/evaluate_offline.py` resolves the data and the
checkpoints from the config).

Every mask and every patient template is computed on the full, time-ordered record sequence
first (a template needs the patient's previous beats), and only then are rows subsampled.
Metrics count masked samples inside the signal-bearing part of a beat only.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score
from tqdm import tqdm

from models import data as D
from models import plots
from models.baselines import linear_fill, spline_fill, template_fill, zero_fill
from models.config import DEFAULT_CHECKPOINT, TrainConfig
from models.masks import block, bursty, contiguous_gap, mask_batch, training_mask
from models.model import Repair, load_checkpoint, repair
from models.rhythm import N_FEATURES as N_RHYTHM
from models.rhythm import UNKNOWN as RHYTHM_UNKNOWN
from models.templates import TemplateSpec
from models.train import BeatContext, beat_context, ecg5000_scores, split_beats

BATCH = 1024
F_RECORDS = {"DS1": "208", "DS2": "213"}  # almost every F beat of each set comes from these


def _no_mask(rng, length: int, width: int):
    return np.zeros(width, bool)


def _reference_block(rng, length: int, width: int):
    return block(length, width)


# name -> (description, per-beat mask function (rng, length, width) -> bool, True = missing)
CONDITIONS = {
    "clean": ("no missing samples", _no_mask),
    "block": (
        "reference block, samples 100-137 of every beat (beats whose signal reaches sample 100 "
        "count); the running template never observes them, so it falls back to linear there",
        _reference_block,
    ),
    "gap": ("one random contiguous gap of 5-40% of the signal", contiguous_gap),
    "bursty": (
        "Gilbert-Elliott packet loss, 5-sample packets (p_enter 0.02, p_leave 0.15)",
        bursty,
    ),
    "mix": ("the training mix: gaps, block, bursts, single drops, or none", training_mask),
}
IMPUTATION_MASKS = ("block", "gap", "bursty")
INTER_SETTINGS = {"inter": "clean", "inter_gap": "gap", "inter_mix": "mix"}
COLD_BEATS = 20  # a patient's first beats: no rhythm yet, little history
ANOMALY_SETTINGS = {"mitdb_clean": "clean", "mitdb_gap": "gap"}

# baseline name -> filler(observed, missing, template); the model is evaluated next to them
BASELINES = {
    "template": template_fill,
    "linear": lambda observed, missing, template: linear_fill(observed, missing),
    "spline": lambda observed, missing, template: spline_fill(observed, missing),
    "zero": lambda observed, missing, template: zero_fill(observed, missing),
}
METHODS = ("model", *BASELINES)

LITERATURE_INTER = (  # study, accuracy, SVEB Se / +P, VEB Se / +P, as each study published
    ("de Chazal 2004", "86.2%", "76 / 39%", "78 / 82%"),
    ("Mar 2011", "89.9%", "83 / 34%", "87 / 76%"),
    ("Zhang 2014", "88.3%", "79 / 36%", "86 / 93%"),
    ("Mondéjar-Guerra 2019", "94.5%", "~78 / ~50%", "~95 / ~87%"),
)
LITERATURE_OTHER = (
    (
        "classification, intra-patient",
        "Kachuee 2018: 93.4% accuracy; seed notebook 0.82; "
        "good 1D-CNNs about 98.5% accuracy and 0.92 macro-F1",
    ),
    (
        "anomaly, ECG5000",
        "seed notebook: 97.3% of normals, 96.9% of anomalies correct; "
        "LSTM-AE papers 98.6-98.7% accuracy, AUC up to 0.997",
    ),
    (
        "imputation, DS2 gap 5-40%",
        "quick probe: linear 0.129, template 0.119, spline 0.415, "
        "zero 0.351, template-aware BiLSTM 0.093 RMSE",
    ),
)


@dataclass
class Run:
    """The model's pass over a set of beats under one mask condition."""

    beats: D.Beats
    missing: np.ndarray
    template: np.ndarray  # the mean template of the baseline (the model may use another)
    out: Repair
    context: BeatContext  # what the model was given
    position: np.ndarray  # each beat's index within its record (0 = the patient's first)


# --------------------------------------------------------------------------- metrics


def _ratio(num, den):
    return float(num / den) if num is not None and den else None


def _rmse(err: np.ndarray, where: np.ndarray):
    return float(np.sqrt(np.mean(err[where] ** 2))) if where.any() else None


def fill_errors(filled: np.ndarray, truth: np.ndarray, missing: np.ndarray, labels) -> dict:
    """Masked-sample RMSE and MAE (pooled over all masked samples), and RMSE per AAMI class."""
    err = filled.astype(np.float64) - truth
    per_class = {
        c: _rmse(err, missing & (labels == k)[:, None]) for k, c in enumerate(D.AAMI_CLASSES)
    }
    mae = float(np.mean(np.abs(err[missing]))) if missing.any() else None
    return {"rmse": _rmse(err, missing), "mae": mae, "per_class": per_class}


def sensitivity_ppv(matrix) -> tuple[list, list]:
    """Per-class sensitivity (recall) and positive predictivity (precision) of a confusion
    matrix with true classes as rows; None where a class has no true (or predicted) beat."""
    cm = np.asarray(matrix, dtype=float)
    hits, true, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    se = [float(h / t) if t else None for h, t in zip(hits, true, strict=True)]
    ppv = [float(h / p) if p else None for h, p in zip(hits, predicted, strict=True)]
    return se, ppv


def classification_metrics(labels: np.ndarray, predicted: np.ndarray) -> dict:
    """Accuracy, macro-F1 over the classes present, per-class Se/+P/F1 and the confusion matrix."""
    classes = list(range(len(D.AAMI_CLASSES)))
    cm = confusion_matrix(labels, predicted, labels=classes)
    present = np.unique(labels)
    se, ppv = sensitivity_ppv(cm)
    f1 = f1_score(labels, predicted, labels=classes, average=None, zero_division=0)
    per_class = {
        c: {
            "support": int(cm[k].sum()),
            "sensitivity": se[k],
            "ppv": ppv[k],
            "f1": float(f1[k]) if cm[k].sum() else None,
        }
        for k, c in enumerate(D.AAMI_CLASSES)
    }
    return {
        "beats": int(len(labels)),
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(
            f1_score(labels, predicted, labels=present, average="macro", zero_division=0)
        ),
        "per_class": per_class,
        "classes": list(D.AAMI_CLASSES),
        "confusion": cm.tolist(),
    }


def _classified(labels: np.ndarray, predicted: np.ndarray) -> dict | None:
    """`classification_metrics`, or None for no beats (a small subsample)."""
    return classification_metrics(labels, predicted) if len(labels) else None


def anomaly_metrics(is_anomaly: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """ROC AUC, and the confusion matrix [[TN, FP], [FN, TP]] of `score > threshold`."""
    is_anomaly = np.asarray(is_anomaly, bool)
    cm = confusion_matrix(is_anomaly, scores > threshold, labels=[False, True])
    (tn, fp), (fn, tp) = cm
    both = 0 < is_anomaly.sum() < len(is_anomaly)
    return {
        "beats": int(len(scores)),
        "normals": int(tn + fp),
        "anomalies": int(fn + tp),
        "threshold": float(threshold),
        "auc": float(roc_auc_score(is_anomaly, scores)) if both else None,
        "accuracy": float((tn + tp) / max(len(scores), 1)),
        "normals_correct": _ratio(tn, tn + fp),
        "anomalies_correct": _ratio(tp, tp + fn),
        "flag_rate_normal": _ratio(fp, tn + fp),
        "flag_rate_anomalous": _ratio(tp, tp + fn),
        "confusion": cm.tolist(),
    }


# --------------------------------------------------------------------------- model runs


def subsample(n: int, max_beats: int, seed: int) -> np.ndarray:
    """Sorted row indices: all rows, or `max_beats` of them drawn with the seed."""
    if max_beats <= 0 or max_beats >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_beats, replace=False))


def batched_repair(
    net, beats: D.Beats, missing, context: BeatContext, desc: str, progress: bool
) -> Repair:
    """`repair` over ~BATCH beats per call, concatenated."""
    parts = [
        repair(
            net,
            beats.samples[s : s + BATCH],
            missing[s : s + BATCH],
            context.template[s : s + BATCH],
            beats.length[s : s + BATCH],
            context.usual[s : s + BATCH],
            context.features[s : s + BATCH],
        )
        for s in tqdm(range(0, len(beats), BATCH), desc=desc, disable=not progress, leave=False)
    ]
    arrays = ("samples", "probabilities", "anomaly_score")
    return Repair(*(np.concatenate([getattr(p, f) for p in parts]) for f in arrays))


def masked_run(net, beats: D.Beats, rows, mask_fn, rng, desc: str, progress: bool) -> Run:
    """Masks and causal context on the full record sequence, then the model on `rows`."""
    missing = mask_batch(mask_fn, rng, beats.length, beats.samples.shape[1])
    baseline = TemplateSpec().batch(beats.samples, missing, beats.length, beats.record)
    context = beat_context(net.config.template, beats, missing).subset(rows)
    sub, missing = beats.subset(rows), missing[rows]
    out = batched_repair(net, sub, missing, context, desc, progress)
    return Run(sub, missing, baseline[rows], out, context, record_positions(beats)[rows])


def record_positions(beats: D.Beats) -> np.ndarray:
    """Each beat's index within its record (beats in record order)."""
    starts = np.flatnonzero(np.r_[True, beats.record[1:] != beats.record[:-1]])
    return np.arange(len(beats)) - np.repeat(starts, np.diff(np.r_[starts, len(beats)]))


def without_rhythm(net, run: Run, progress: bool) -> Repair:
    """The ablation: the same beats and context with every beat's rhythm unknown."""
    features = run.context.features.copy()
    features[:, :N_RHYTHM] = RHYTHM_UNKNOWN
    context = BeatContext(run.context.template, run.context.usual, features)
    return batched_repair(net, run.beats, run.missing, context, "DS2 no rhythm", progress)


def imputation_section(run: Run) -> tuple[dict, dict]:
    """(metrics per method, mask summary) on the beats with at least one missing sample."""
    rows = run.missing.any(1)
    truth, missing = run.beats.samples[rows], run.missing[rows]
    labels, template = run.beats.label[rows], run.template[rows]
    observed = np.where(missing, 0.0, truth).astype(np.float32)
    fills = {"model": run.out.samples[rows]}
    fills |= {name: fill(observed, missing, template) for name, fill in BASELINES.items()}
    results = {name: fill_errors(f, truth, missing, labels) for name, f in fills.items()}
    for r in results.values():
        r["vs_linear"] = _ratio(r["rmse"], results["linear"]["rmse"])
    summary = {
        "beats": int(rows.sum()),
        "masked_samples": int(missing.sum()),
        "masked_fraction": _ratio(missing.sum(), run.beats.length[rows].sum()),
        "class_beats": dict(
            zip(D.AAMI_CLASSES, np.bincount(labels, minlength=5).tolist(), strict=True)
        ),
    }
    return results, summary


def intra_config(meta: dict) -> TrainConfig:
    """The intra-patient split the checkpoint was trained with (its seed and records)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: v for k, v in meta.get("train_config", {}).items() if k in names}
    return TrainConfig(**{**saved, "split": "intra"})


def _model_info(path, meta: dict) -> dict:
    keys = ("version", "created", "anomaly_threshold")
    return {"path": str(path), **{k: meta.get(k) for k in keys}}


# --------------------------------------------------------------------------- sections


def inter_sections(ckpt, data_dir: Path, max_beats: int, seed: int, progress: bool):
    """DS2 under every mask condition with the DS1 checkpoint: (report parts, runs, meta)."""
    net, meta = load_checkpoint(ckpt)
    ds2 = D.load_beats(D.DS2, data_dir)
    rows = subsample(len(ds2), max_beats, seed)
    runs = {
        name: masked_run(
            net, ds2, rows, fn, np.random.default_rng([seed, i]), f"DS2 {name}", progress
        )
        for i, (name, (_, fn)) in enumerate(CONDITIONS.items())
    }
    imputation = {m: imputation_section(runs[m]) for m in IMPUTATION_MASKS}
    labels = runs["clean"].beats.label
    is_f = labels == D.AAMI_CLASSES.index("F")
    threshold = meta["anomaly_threshold"]
    parts = {
        "beats": {
            "ds2_total": len(ds2),
            "ds2_evaluated": len(rows),
            "ds2_f": int(is_f.sum()),
            "ds2_f_from_213": int((runs["clean"].beats.record[is_f] == "213").sum()),
        },
        "masks": {
            m: {"description": CONDITIONS[m][0], **imputation[m][1]} for m in IMPUTATION_MASKS
        },
        "imputation": {m: imputation[m][0] for m in IMPUTATION_MASKS},
        "classification": {
            key: classification_metrics(runs[c].beats.label, runs[c].out.probabilities.argmax(1))
            for key, c in INTER_SETTINGS.items()
        },
        "anomaly": {
            key: anomaly_metrics(labels != 0, runs[c].out.anomaly_score, threshold)
            for key, c in ANOMALY_SETTINGS.items()
        },
    }
    clean = runs["clean"]
    predicted = clean.out.probabilities.argmax(1)
    cold = clean.position < COLD_BEATS
    parts["classification"] |= {
        "inter_no_rhythm": classification_metrics(
            labels, without_rhythm(net, clean, progress).probabilities.argmax(1)
        ),
        "inter_cold_start": _classified(labels[cold], predicted[cold]),
        "inter_warm": _classified(labels[~cold], predicted[~cold]),
    }
    return parts, runs, meta


def intra_section(ckpt, data_dir: Path, max_beats: int, seed: int, progress: bool):
    """Clean intra-patient test beats with the intra checkpoint: (metrics, beat counts, meta).

    Templates come from the patient's previous beats within the test split.
    """
    net, meta = load_checkpoint(ckpt)
    test = split_beats(intra_config(meta), data_dir)[1]
    rows = subsample(len(test), max_beats, seed)
    run = masked_run(net, test, rows, _no_mask, None, "intra test", progress)
    metrics = classification_metrics(run.beats.label, run.out.probabilities.argmax(1))
    return metrics, {"intra_test_total": len(test), "intra_test_evaluated": len(rows)}, meta


def ecg5000_section(ckpt, directory: Path, progress: bool):
    """ECG5000 TEST, class 1 normal vs the rest, at the checkpoint's threshold."""
    net, meta = load_checkpoint(ckpt)
    x, y = D.load_ecg5000(directory, "TEST")
    batches = tqdm(range(0, len(x), BATCH), desc="ECG5000", disable=not progress, leave=False)
    scores = np.concatenate([ecg5000_scores(net, x[s : s + BATCH]) for s in batches])
    return anomaly_metrics(y != 1, scores, meta["anomaly_threshold"]), meta


def training_summary(metas: dict[str, dict]) -> dict:
    """The last epoch of each checkpoint's training history."""
    return {
        name: {"epochs": len(m["history"]), **m["history"][-1]}
        for name, m in metas.items()
        if m.get("history")
    }


# --------------------------------------------------------------------------- the report


def evaluate(
    out_dir,
    data_dir,
    ecg5000_dir=None,
    inter_ckpt=DEFAULT_CHECKPOINT,
    intra_ckpt=None,
    ecg5000_ckpt=None,
    max_beats: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Evaluate the checkpoints; write report.md, report.json and figures; return the report.

    `max_beats` > 0 evaluates that many random DS2 beats (and intra test beats) only. A None
    `intra_ckpt` or `ecg5000_ckpt`/`ecg5000_dir` skips that part (its entry is None).

    report.json layout (RMSE/MAE in units of the [0, 1]-scaled beat; rates in [0, 1];
    None where undefined):

    - date, command, seed, max_beats, data{mitdb, ecg5000}
    - models[inter|intra|ecg5000]: {path, version, created, anomaly_threshold} or None
    - beats: {ds2_total, ds2_evaluated, ds2_f, ds2_f_from_213, intra_test_total,
      intra_test_evaluated, ecg5000_test}
    - masks[block|gap|bursty]: {description, beats, masked_samples, masked_fraction,
      class_beats{N..Q}} (beats = evaluated beats with at least one missing sample)
    - imputation[block|gap|bursty][model|template|linear|spline|zero]:
      {rmse, mae, vs_linear, per_class{N,S,V,F,Q: rmse}}
    - classification[inter|inter_gap|inter_mix|inter_no_rhythm|inter_cold_start|inter_warm|
      intra]: {beats, accuracy, macro_f1, per_class{N..Q: {support, sensitivity, ppv, f1}},
      classes, confusion (rows = true)} (inter: DS1 model on clean DS2; inter_gap: random-gap
      mask; inter_mix: training mix; inter_no_rhythm: clean with every RR feature unknown;
      inter_cold_start / inter_warm: each record's first COLD_BEATS beats / the rest)
    - anomaly[mitdb_clean|mitdb_gap|ecg5000]: {beats, normals, anomalies, threshold, auc,
      accuracy, normals_correct, anomalies_correct, flag_rate_normal, flag_rate_anomalous,
      confusion [[TN, FP], [FN, TP]]}
    - training[inter|intra]: last epoch of the history {epochs, epoch, loss, impute_mse, ...}
    - figures: file names in out_dir
    """
    out, data_dir = Path(out_dir), Path(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts, runs, inter_meta = inter_sections(inter_ckpt, data_dir, max_beats, seed, progress)
    metas = {"inter": inter_meta}
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": _command(out_dir, max_beats, seed),
        "seed": seed,
        "max_beats": max_beats,
        "data": {"mitdb": str(data_dir), "ecg5000": str(ecg5000_dir) if ecg5000_dir else None},
        "models": {"inter": _model_info(inter_ckpt, inter_meta), "intra": None, "ecg5000": None},
        **parts,
    }
    report["classification"]["intra"] = None
    report["anomaly"]["ecg5000"] = None
    if intra_ckpt:
        metrics, counts, metas["intra"] = intra_section(
            intra_ckpt, data_dir, max_beats, seed, progress
        )
        report["classification"]["intra"] = metrics
        report["beats"] |= counts
        report["models"]["intra"] = _model_info(intra_ckpt, metas["intra"])
    if ecg5000_ckpt and ecg5000_dir:
        report["anomaly"]["ecg5000"], meta = ecg5000_section(ecg5000_ckpt, ecg5000_dir, progress)
        report["beats"]["ecg5000_test"] = report["anomaly"]["ecg5000"]["beats"]
        report["models"]["ecg5000"] = _model_info(ecg5000_ckpt, meta)
    report["training"] = training_summary(metas)
    report["figures"] = make_figures(out, runs, report, metas, seed)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    return report


def _command(out_dir, max_beats: int, seed: int) -> str:
    extra = (f" --max-beats {max_beats}" if max_beats else "") + (f" --seed {seed}" if seed else "")
    return f"ecg-stream evaluate --out {out_dir}{extra}"


# --------------------------------------------------------------------------- figures


def pick_examples(run: Run, rng, n: int) -> np.ndarray:
    """Up to n beats with a gap, one class after another (N, S, V, F, Q), random within."""
    pools = [
        list(rng.permutation(np.flatnonzero(run.missing.any(1) & (run.beats.label == k))))
        for k in range(len(D.AAMI_CLASSES))
    ]
    picked = []
    while len(picked) < n and any(pools):
        picked += [pool.pop() for pool in pools if pool][: n - len(picked)]
    return np.array(picked, dtype=int)


def make_figures(out: Path, runs: dict[str, Run], report: dict, metas: dict, seed: int) -> list:
    """Repair examples (one row per imputation mask), confusion matrices, training curves."""
    rng = np.random.default_rng(seed)
    picks = [(m, i) for m in IMPUTATION_MASKS for i in pick_examples(runs[m], rng, 4)]
    names = ["repairs.png"]
    plots.plot_repairs(
        out / names[0],
        [runs[m].beats.samples[i] for m, i in picks],
        [runs[m].missing[i] for m, i in picks],
        [runs[m].out.samples[i] for m, i in picks],
        [runs[m].beats.length[i] for m, i in picks],
        [
            f"{m} · rec {runs[m].beats.record[i]} · {D.AAMI_CLASSES[runs[m].beats.label[i]]}"
            for m, i in picks
        ],
    )
    for key, metrics in report["classification"].items():
        if metrics:
            names.append(f"confusion-{key}.png")
            plots.plot_confusion(
                out / names[-1],
                metrics["confusion"],
                metrics["classes"],
                f"{key}: acc {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}",
            )
    histories = {k: m["history"] for k, m in metas.items() if m.get("history")}
    if histories:
        names.append("training.png")
        plots.plot_history(out / names[-1], histories)
    return names


# --------------------------------------------------------------------------- markdown


def _fmt(value, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _table(header, rows) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _imputation_md(report: dict) -> list[str]:
    lines = ["## Imputation (DS2, masked-sample error on the signal-bearing part)", ""]
    header = ["method", "RMSE", "MAE", "vs linear", *(f"RMSE {c}" for c in D.AAMI_CLASSES)]
    for mask, results in report["imputation"].items():
        s = report["masks"][mask]
        lines += [
            f"**{mask}**: {s['description']}. {s['beats']} beats, {s['masked_samples']} "
            f"masked samples ({_pct(s['masked_fraction'])} of their signal).",
            "",
        ]
        lines += _table(
            header,
            [
                [
                    m,
                    _fmt(r["rmse"]),
                    _fmt(r["mae"]),
                    _fmt(r["vs_linear"], ".2f") + "×",
                    *(_fmt(r["per_class"][c]) for c in D.AAMI_CLASSES),
                ]
                for m, r in results.items()
            ],
        ) + [""]
    return lines


def _se_ppv(metrics: dict, cls: str) -> str:
    c = metrics["per_class"][cls]
    return f"{_pct(c['sensitivity'])} / {_pct(c['ppv'])}"


def _classification_md(report: dict) -> list[str]:
    b = report["beats"]
    header = [
        "setting",
        "beats",
        "accuracy",
        "macro-F1",
        *(f"{c} Se / +P" + ("*" if c == "F" else "") for c in D.AAMI_CLASSES),
    ]
    rows = [
        [
            key,
            m["beats"],
            _pct(m["accuracy"]),
            _fmt(m["macro_f1"], ".3f"),
            *(_se_ppv(m, c) for c in D.AAMI_CLASSES),
        ]
        for key, m in report["classification"].items()
        if m
    ]
    ours = report["classification"]["inter"]
    anchors = [
        *LITERATURE_INTER,
        (
            "this model (inter, clean)",
            _pct(ours["accuracy"]),
            _se_ppv(ours, "S"),
            _se_ppv(ours, "V"),
        ),
    ]
    return [
        "## Classification (AAMI classes)",
        "",
        "inter: DS1 model on clean DS2 beats; inter_gap: with the random-gap mask; inter_mix: "
        "with the training mask mix; inter_no_rhythm: clean, every beat's RR features set to "
        "unknown (the ablation); inter_cold_start: each record's first "
        f"{COLD_BEATS} beats (no rhythm yet, little history), inter_warm: the rest; intra: "
        "random beat split (leaks patients). macro-F1 is "
        "over the classes present. Se = sensitivity, +P = positive predictivity.",
        "",
        *_table(header, rows),
        "",
        f"\\* Almost all F beats come from one patient: record {F_RECORDS['DS1']} in DS1 and "
        f"{F_RECORDS['DS2']} in DS2 (here {b['ds2_f_from_213']} of the {b['ds2_f']} evaluated "
        "DS2 F beats). The inter-patient F numbers mostly measure that one patient.",
        "",
        "Literature anchors, inter-patient DS1→DS2 (as published by each study):",
        "",
        *_table(["study", "accuracy", "SVEB (S) Se / +P", "VEB (V) Se / +P"], anchors),
        "",
    ]


def _anomaly_md(report: dict) -> list[str]:
    header = [
        "data",
        "beats",
        "normals",
        "anomalies",
        "threshold",
        "AUC",
        "accuracy",
        "flagged: N beats",
        "flagged: other beats",
    ]
    rows = [
        [
            key,
            m["beats"],
            m["normals"],
            m["anomalies"],
            _fmt(m["threshold"], ".5f"),
            _fmt(m["auc"], ".3f"),
            _pct(m["accuracy"]),
            _pct(m["flag_rate_normal"]),
            _pct(m["flag_rate_anomalous"]),
        ]
        for key, m in report["anomaly"].items()
        if m
    ]
    return [
        "## Anomaly flags (score > stored threshold)",
        "",
        "mitdb: DS1 model on DS2, N vs the rest (clean, and under the random-gap mask); "
        "ecg5000: TEST, class 1 normal vs the rest. Flagged: the share of each kind of beat "
        "whose score is above the threshold (for N beats: the false-flag rate).",
        "",
        *_table(header, rows),
        "",
    ]


def _context_md(report: dict) -> list[str]:
    models = [
        [k, m["version"], m.get("created") or "–", m["path"]]
        for k, m in report["models"].items()
        if m
    ]
    training = [
        [
            k,
            t["epochs"],
            _fmt(t["loss"]),
            _fmt(np.sqrt(t["impute_mse"])),
            _fmt(t["class_ce"]),
            _fmt(t.get("anomaly_loss", t.get("recon_mse"))),
        ]
        for k, t in report["training"].items()
    ]
    return [
        "## Models",
        "",
        *_table(["role", "version", "created", "checkpoint"], models),
        "",
        "Final training epoch:",
        "",
        *_table(["model", "epochs", "loss", "impute RMSE", "class CE", "anomaly loss"], training),
        "",
        "## Other reference numbers",
        "",
        *_table(["task", "reference"], LITERATURE_OTHER),
        "",
    ]


def render_markdown(report: dict) -> str:
    """The human-readable report: concise tables with methods/settings as rows."""
    b = report["beats"]
    head = [
        "# ecg-stream evaluation",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- DS2 beats: {b['ds2_evaluated']} of {b['ds2_total']}"
        + (
            f"; intra test beats: {b['intra_test_evaluated']} of {b['intra_test_total']}"
            if "intra_test_total" in b
            else ""
        )
        + (f"; ECG5000 TEST beats: {b['ecg5000_test']}" if "ecg5000_test" in b else ""),
        f"- seed: {report['seed']}",
        "",
    ]
    figures = ["## Figures", "", *(f"![{name}]({name})" for name in report["figures"]), ""]
    sections = (_imputation_md, _classification_md, _anomaly_md, _context_md)
    return "\n".join(head + [line for s in sections for line in s(report)] + figures)
