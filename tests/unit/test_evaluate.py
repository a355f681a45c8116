"""Evaluation: metric helpers on hand-computed cases, and a smoke run on real DS2 beats."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from models import evaluate as E
from models.config import CHECKPOINTS  # the committed models/weights/*.pt

SMOKE_BEATS = 400


def require(path: Path | None, what: str) -> Path:
    """`path` if it exists; otherwise skip the test, or fail it when CI=true."""
    if path is not None and Path(path).exists():
        return Path(path)
    reason = f"{what} not found ({path})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI must provide it")
    pytest.skip(reason)


def mitdb_dir() -> Path:
    """MIT-BIH from ECG_DATA_DIR (skip when unset or missing, fail under CI)."""
    value = os.environ.get("ECG_DATA_DIR")
    return require(Path(value) if value else None, "MIT-BIH data (ECG_DATA_DIR)").resolve()


# --------------------------------------------------------------------------- metric helpers


def test_sensitivity_ppv_from_known_matrix():
    cm = [[5, 1, 0], [2, 3, 0], [0, 0, 0]]
    se, ppv = E.sensitivity_ppv(cm)
    assert se[:2] == pytest.approx([5 / 6, 3 / 5]) and se[2] is None
    assert ppv[:2] == pytest.approx([5 / 7, 3 / 4]) and ppv[2] is None


def test_classification_metrics_hand_computed():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 0, 2])
    m = E.classification_metrics(labels, predicted)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # F1: N 2/3, S 1/2, V 1; F and Q are absent and do not count
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["per_class"]["N"] == pytest.approx(
        {"support": 3, "sensitivity": 2 / 3, "ppv": 2 / 3, "f1": 2 / 3}
    )
    assert m["per_class"]["F"] == {"support": 0, "sensitivity": None, "ppv": None, "f1": None}
    assert m["confusion"][0][:3] == [2, 1, 0] and m["confusion"][1][:3] == [1, 1, 0]
    assert np.array(m["confusion"]).shape == (5, 5)


def test_anomaly_metrics_hand_computed():
    is_anomaly = np.array([False, False, False, True, True])
    scores = np.array([0.1, 0.2, 0.6, 0.5, 0.9])
    m = E.anomaly_metrics(is_anomaly, scores, threshold=0.4)
    assert m["confusion"] == [[2, 1], [0, 2]]  # [[TN, FP], [FN, TP]]
    assert m["accuracy"] == pytest.approx(4 / 5)
    assert m["normals_correct"] == pytest.approx(2 / 3)
    assert m["anomalies_correct"] == pytest.approx(1.0)
    assert m["flag_rate_normal"] == pytest.approx(1 / 3) and m["flag_rate_anomalous"] == 1.0
    assert m["auc"] == pytest.approx(5 / 6)  # 5 of the 6 (anomaly, normal) pairs ranked right


def test_fill_errors_count_masked_samples_only():
    truth = np.zeros((2, 4), np.float32)
    filled = np.array([[1, 0, 9, 9], [9, 2, 9, 9]], np.float32)  # 9s are observed: ignored
    missing = np.array([[True, True, False, False], [False, True, False, False]])
    r = E.fill_errors(filled, truth, missing, np.array([0, 2]))
    assert r["rmse"] == pytest.approx(np.sqrt(5 / 3))
    assert r["mae"] == pytest.approx(1.0)
    assert r["per_class"]["N"] == pytest.approx(np.sqrt(1 / 2))
    assert r["per_class"]["V"] == pytest.approx(2.0)
    assert r["per_class"]["S"] is None


def test_subsample_is_sorted_reproducible_and_bounded():
    a = E.subsample(1000, 50, seed=3)
    assert len(a) == 50 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, E.subsample(1000, 50, seed=3))
    assert np.array_equal(E.subsample(10, 0, seed=3), np.arange(10))
    assert np.array_equal(E.subsample(10, 20, seed=3), np.arange(10))


# --------------------------------------------------------------------------- smoke run


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A full evaluation on a few hundred DS2 beats with the committed checkpoints."""
    data_dir = mitdb_dir()
    ecg5000 = require(data_dir.parent / "ecg5000", "ECG5000 data (sibling 'ecg5000')")
    ckpt = {role: require(path, f"checkpoint {role}") for role, path in CHECKPOINTS.items()}
    out = tmp_path_factory.mktemp("evaluation")
    report = E.evaluate(
        out,
        data_dir,
        ecg5000,
        ckpt["inter"],
        ckpt["intra"],
        ckpt["ecg5000"],
        max_beats=SMOKE_BEATS,
        seed=0,
        progress=False,
    )
    return out, report


def test_smoke_writes_report_files(smoke):
    out, report = smoke
    for name in ["report.md", "report.json", *report["figures"]]:
        assert (out / name).stat().st_size > 0, name
    assert {"repairs.png", "confusion-inter.png", "confusion-intra.png"} <= set(report["figures"])
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    md = (out / "report.md").read_text()
    assert "ecg-stream evaluate --out" in md and "de Chazal 2004" in md and "213" in md


def test_smoke_report_keys(smoke):
    _, report = smoke
    assert report["beats"]["ds2_evaluated"] == SMOKE_BEATS
    for mask in E.IMPUTATION_MASKS:
        assert report["masks"][mask]["beats"] > 0
        for method in E.METHODS:
            assert report["imputation"][mask][method]["rmse"] > 0
    assert 0 <= report["classification"]["inter"]["macro_f1"] <= 1
    ablation = report["classification"]["inter_no_rhythm"]
    assert ablation["beats"] == SMOKE_BEATS
    cold, warm = (report["classification"][k] for k in ("inter_cold_start", "inter_warm"))
    assert (cold["beats"] if cold else 0) + warm["beats"] == SMOKE_BEATS
    assert 0 <= report["classification"]["intra"]["accuracy"] <= 1
    assert 0 <= report["anomaly"]["ecg5000"]["accuracy"] <= 1
    assert report["anomaly"]["mitdb_gap"]["auc"] is not None


def test_smoke_model_beats_linear_on_random_gap(smoke):
    _, report = smoke
    gap = report["imputation"]["gap"]
    assert gap["model"]["rmse"] < gap["linear"]["rmse"]
    assert gap["model"]["vs_linear"] < 1
