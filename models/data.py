"""Beats from MIT-BIH (wfdb), the Kaggle heartbeat CSVs and ECG5000, plus the standard splits.

A canonical beat follows Kachuee et al. 2018 so that it matches the Kaggle heartbeat CSVs:
the MLII lead is resampled to 125 Hz, each 10 s window is scaled to [0, 1], and a beat runs
from its R-peak to R-peak + 1.2 x the window's median RR interval, zero-padded to 187 samples.
`Beats.length` records how many leading samples carry signal; the rest is padding.

This module never imports torch or Kafka: the simulator uses it too.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FS_RAW = 360
FS_BEAT = 125
BEAT_LEN = 187
WINDOW_S = 10.0
AAMI_CLASSES = ("N", "S", "V", "F", "Q")

# AAMI EC57 mapping of MIT-BIH beat symbols. Every other symbol is not a beat.
SYMBOL_TO_AAMI = {
    **dict.fromkeys("NLRej", "N"),
    **dict.fromkeys("AaJS", "S"),
    **dict.fromkeys("VE", "V"),
    "F": "F",
    **dict.fromkeys("/fQ", "Q"),
}

# Inter-patient split of de Chazal et al. 2004; the paced records are excluded.
DS1 = [
    "101",
    "106",
    "108",
    "109",
    "112",
    "114",
    "115",
    "116",
    "118",
    "119",
    "122",
    "124",
    "201",
    "203",
    "205",
    "207",
    "208",
    "209",
    "215",
    "220",
    "223",
    "230",
]
DS2 = [
    "100",
    "103",
    "105",
    "111",
    "113",
    "117",
    "121",
    "123",
    "200",
    "202",
    "210",
    "212",
    "213",
    "214",
    "219",
    "221",
    "222",
    "228",
    "231",
    "232",
    "233",
    "234",
]
PACED = ("102", "104", "107", "217")
ALL_RECORDS = tuple(sorted(DS1 + DS2 + list(PACED)))
NOISE_RECORDS = ("bw", "em", "ma")


class DataNotFoundError(RuntimeError):
    """The dataset is neither at the configured location nor downloadable."""


@dataclass
class Beats:
    """A set of canonical beats with their provenance."""

    samples: np.ndarray  # (n, 187) float32, zero-padded after `length`
    length: np.ndarray  # (n,) int16: signal-bearing samples
    label: np.ndarray  # (n,) int8: index into AAMI_CLASSES
    record: np.ndarray  # (n,) str: source record (or file)
    time: np.ndarray  # (n,) float64: R-peak time in seconds within the record

    def __len__(self) -> int:
        return len(self.label)

    def subset(self, index) -> Beats:
        """Rows selected by an index array or boolean mask."""
        return Beats(*(a[index] for a in self._arrays()))

    def _arrays(self):
        return (self.samples, self.length, self.label, self.record, self.time)

    @staticmethod
    def concat(parts: list[Beats]) -> Beats:
        """Concatenate several beat sets in order."""
        return Beats(*(np.concatenate(cols) for cols in zip(*(p._arrays() for p in parts))))

    def class_counts(self) -> dict[str, int]:
        """Number of beats per AAMI class."""
        counts = np.bincount(self.label, minlength=len(AAMI_CLASSES))
        return {c: int(n) for c, n in zip(AAMI_CLASSES, counts)}


# --------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """The user cache directory for downloads and derived beat caches (never the repo)."""
    base = os.environ.get("ECG_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ecg-stream"
    )
    return Path(base)


def _has_records(directory: Path, records) -> bool:
    return all((directory / f"{r}.hea").exists() for r in records)


def locate_database(
    name: str, configured: str | os.PathLike | None, records, download: bool = True
) -> Path:
    """Find a PhysioNet database: the configured directory, else the cache, else download it.

    Raises DataNotFoundError with a one-line explanation when none works.
    """
    if configured:
        path = Path(configured).expanduser()
        if not _has_records(path, records):
            raise DataNotFoundError(f"{name} records not found in {path}")
        return path
    cached = cache_dir() / name
    if _has_records(cached, records):
        return cached
    if not download:
        raise DataNotFoundError(f"{name} not found: set its directory (e.g. ECG_DATA_DIR)")
    return download_database(name, cached, records)


def download_database(name: str, target: Path, records) -> Path:
    """Download PhysioNet database `name` with wfdb into `target`."""
    import wfdb

    target.mkdir(parents=True, exist_ok=True)
    try:
        wfdb.dl_database(name, dl_dir=str(target), records=list(records))
    except Exception as exc:  # wfdb raises plain requests/HTTP errors
        raise DataNotFoundError(
            f"cannot download {name} from PhysioNet ({type(exc).__name__}: {exc}); "
            "set the data directory instead (e.g. ECG_DATA_DIR)"
        ) from exc
    if not _has_records(target, records):
        raise DataNotFoundError(f"download of {name} into {target} is incomplete")
    return target


# --------------------------------------------------------------------------- MIT-BIH


def read_lead(record: str, data_dir: Path, lead: str = "MLII") -> tuple[np.ndarray, int]:
    """One lead of a record in mV, chosen by name (MLII is not always the first channel)."""
    import wfdb

    rec = wfdb.rdrecord(str(Path(data_dir) / record))
    if lead not in rec.sig_name:
        raise DataNotFoundError(f"record {record} has no {lead} lead (leads: {rec.sig_name})")
    return rec.p_signal[:, rec.sig_name.index(lead)].astype(np.float64), int(rec.fs)


def read_beat_annotations(record: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """R-peak sample indices and AAMI labels of the annotated beats of a record."""
    import wfdb

    ann = wfdb.rdann(str(Path(data_dir) / record), "atr")
    keep = [i for i, s in enumerate(ann.symbol) if s in SYMBOL_TO_AAMI]
    labels = np.array([AAMI_CLASSES.index(SYMBOL_TO_AAMI[ann.symbol[i]]) for i in keep], np.int8)
    return np.asarray(ann.sample)[keep], labels


def segment_beats(signal_125: np.ndarray, peaks_125: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut canonical beats (Kachuee 2018) from a 125 Hz signal at the given R-peaks."""
    n = len(signal_125)
    win = int(WINDOW_S * FS_BEAT)
    out = np.zeros((len(peaks_125), BEAT_LEN), np.float32)
    lengths = np.zeros(len(peaks_125), np.int16)
    overall_rr = float(np.median(np.diff(peaks_125))) if len(peaks_125) > 1 else FS_BEAT
    window_of = peaks_125 // win
    for w in np.unique(window_of):
        lo, hi = w * win, min((w + 1) * win, n)
        seg = signal_125[lo:hi]
        smin, span = seg.min(), max(seg.max() - seg.min(), 1e-9)
        in_window = np.flatnonzero(window_of == w)
        rr = np.diff(peaks_125[in_window])
        period = float(np.median(rr)) if len(rr) else overall_rr
        width = int(min(BEAT_LEN, max(1, round(1.2 * period))))
        for i in in_window:
            r = int(peaks_125[i])
            piece = signal_125[r : min(r + width, n)]
            out[i, : len(piece)] = np.clip((piece - smin) / span, 0.0, 1.0)
            lengths[i] = len(piece)
    return out, lengths


def to_beat_rate(signal: np.ndarray, fs: int) -> np.ndarray:
    """Resample a signal from fs to FS_BEAT (polyphase, scipy)."""
    from scipy.signal import resample_poly  # here: the stream worker never loads scipy

    return resample_poly(signal, FS_BEAT, fs)


def extract_beats(record: str, data_dir: Path, lead: str = "MLII") -> Beats:
    """All annotated beats of one MIT-BIH record as canonical beats."""
    signal, fs = read_lead(record, data_dir, lead)
    peaks, labels = read_beat_annotations(record, data_dir)
    signal_125 = to_beat_rate(signal, fs)
    peaks_125 = np.minimum(np.round(peaks * FS_BEAT / fs).astype(np.int64), len(signal_125) - 1)
    samples, lengths = segment_beats(signal_125, peaks_125)
    n = len(labels)
    return Beats(samples, lengths, labels, np.full(n, record), peaks / fs)


def load_beats(records, data_dir: Path, use_cache: bool = True) -> Beats:
    """Canonical beats of several records, cached per record in the user cache directory."""
    parts = []
    for record in records:
        parts.append(_cached_record_beats(str(record), Path(data_dir), use_cache))
    return Beats.concat(parts)


def _cached_record_beats(record: str, data_dir: Path, use_cache: bool) -> Beats:
    hea = data_dir / f"{record}.hea"
    stamp = hashlib.sha1(f"{hea.resolve()}:{hea.stat().st_mtime_ns}:v1".encode()).hexdigest()[:12]
    path = cache_dir() / "beats" / f"{record}-{stamp}.npz"
    if use_cache and path.exists():
        z = np.load(path)
        return Beats(z["samples"], z["length"], z["label"], z["record"], z["time"])
    beats = extract_beats(record, data_dir)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")  # concurrent trainings share the cache
        np.savez(
            tmp, **dict(zip(("samples", "length", "label", "record", "time"), beats._arrays()))
        )
        tmp.replace(path)
    return beats


def read_noise(name: str, nstdb_dir: Path) -> np.ndarray:
    """A noise record of the Noise Stress Test Database (bw, em, ma) at 125 Hz, in mV."""
    if name not in NOISE_RECORDS:
        raise ValueError(f"unknown noise record {name!r}; expected one of {NOISE_RECORDS}")
    signal, fs = read_lead(name, nstdb_dir, lead="noise1")
    return to_beat_rate(signal, fs)


# --------------------------------------------------------------------------- other formats


def load_kaggle_csv(path: str | os.PathLike) -> Beats:
    """Beats from a Kaggle heartbeat CSV (mitbih_train.csv / mitbih_test.csv).

    Each row holds 187 samples followed by the class 0-4 (N, S, V, F, Q). The signal length
    is taken as the position after the last non-zero sample (the rest is padding).
    """
    import pandas as pd

    frame = pd.read_csv(path, header=None)
    if frame.shape[1] != BEAT_LEN + 1:
        raise ValueError(f"{path}: expected {BEAT_LEN + 1} columns, found {frame.shape[1]}")
    values = frame.to_numpy(np.float32)
    samples, labels = values[:, :BEAT_LEN], values[:, BEAT_LEN]
    if not np.isin(labels, np.arange(len(AAMI_CLASSES))).all():
        raise ValueError(f"{path}: labels must be 0-4")
    nonzero = samples != 0
    lengths = np.where(nonzero.any(1), BEAT_LEN - np.argmax(nonzero[:, ::-1], axis=1), 0)
    n = len(samples)
    return Beats(
        samples,
        lengths.astype(np.int16),
        labels.astype(np.int8),
        np.full(n, Path(path).name),
        np.zeros(n),
    )


def load_ecg5000(directory: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """ECG5000 (UCR tsv: label then 140 values) as (beats float32 (n, 140), labels 1-5)."""
    if split not in ("TRAIN", "TEST"):
        raise ValueError("split must be TRAIN or TEST")
    path = Path(directory) / f"ECG5000_{split}.tsv"
    if not path.exists():
        raise DataNotFoundError(f"ECG5000 file not found: {path}")
    values = np.loadtxt(path, delimiter="\t", dtype=np.float32)
    return values[:, 1:], values[:, 0].astype(np.int8)


# --------------------------------------------------------------------------- splits


def intra_patient_split(beats: Beats, test_fraction: float = 0.2, seed: int = 0):
    """Random beat-level split (leaks patients; only for comparison with the literature)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(beats))
    n_test = int(round(test_fraction * len(beats)))
    return np.sort(order[n_test:]), np.sort(order[:n_test])
