"""`ecg-stream evaluate` and `evaluate-events`: resolve data and checkpoints from the config,
then run the offline evaluations of `models.evaluate` (imputation, classification, anomaly;
report + figures) and `models.evaluate_events` (rhythm episodes against the annotations)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models import data as D
from models.config import CHECKPOINTS, DEFAULT_CHECKPOINT
from stream.config import Config, resolve_data_dirs


def run_evaluation(cfg: Config, out: Path, max_beats: int = 0) -> dict:
    """Evaluate the configured (default: committed) checkpoints; returns the report dict."""
    from models.evaluate import evaluate

    dirs = resolve_data_dirs(cfg)
    data_dir = D.locate_database("mitdb", dirs.mitdb_dir, D.ALL_RECORDS, cfg.data.download)
    ecg5000 = Path(dirs.ecg5000_dir) if dirs.ecg5000_dir else None
    if ecg5000 is None or not (ecg5000 / "ECG5000_TEST.tsv").exists():
        raise D.DataNotFoundError("ECG5000 not found: set data.ecg5000_dir (ECG5000_DIR)")
    inter = Path(cfg.model.checkpoint or DEFAULT_CHECKPOINT)
    for path in (inter, CHECKPOINTS["intra"]):
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path} (run make train)")
    ae = Path(cfg.model.ecg5000_checkpoint or CHECKPOINTS["ecg5000"])
    return evaluate(out, data_dir, ecg5000, inter, CHECKPOINTS["intra"], ae, max_beats=max_beats)


def simulator_dropout(cfg: Config):
    """beats -> (missing, lost): the simulator's configured dropout over every beat."""
    from simulator.patients import Dropout

    def masks(beats: D.Beats):
        dropout = Dropout(cfg.simulator.dropout, np.random.default_rng(cfg.simulator.seed), None)
        missing = np.zeros(beats.samples.shape, bool)
        lost = np.zeros(len(beats), bool)
        for i, n in enumerate(beats.length.tolist()):
            missing[i, :n] = dropout.missing(n)
            lost[i] = dropout.lost()
        return missing, lost

    return masks


def run_event_evaluation(cfg: Config, out: Path) -> dict:
    """Replay DS2 through the model and the rhythm stage; returns the report dict."""
    from models.evaluate_events import evaluate_events

    dirs = resolve_data_dirs(cfg)
    data_dir = D.locate_database("mitdb", dirs.mitdb_dir, D.DS2, cfg.data.download)
    checkpoint = Path(cfg.model.checkpoint or DEFAULT_CHECKPOINT)
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint} (run make train)")
    return evaluate_events(
        out, data_dir, checkpoint, cfg.episodes, simulator_dropout(cfg), cfg.worker.beat_alerts
    )
