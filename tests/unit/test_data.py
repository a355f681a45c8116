"""Beat extraction, AAMI mapping, loaders and splits on the real datasets."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import wfdb

from models import data as D


def test_record_100_beats_match_annotations(data_dir, record_100):
    ann = wfdb.rdann(str(data_dir / "100"), "atr")
    symbols = collections.Counter(ann.symbol)
    # Record 100: 2239 N, 33 A, 1 V and one non-beat '+' annotation.
    assert symbols["+"] == 1
    assert len(record_100) == sum(n for s, n in symbols.items() if s in D.SYMBOL_TO_AAMI)
    assert len(record_100) == 2273
    assert record_100.class_counts() == {"N": 2239, "S": 33, "V": 1, "F": 0, "Q": 0}


def test_canonical_beats_are_kaggle_shaped(record_100):
    assert record_100.samples.shape == (2273, D.BEAT_LEN)
    assert record_100.samples.min() >= 0 and record_100.samples.max() <= 1
    lengths = record_100.length
    assert lengths.min() >= 1 and lengths.max() <= D.BEAT_LEN
    # Beyond the signal-bearing part a beat is zero padding.
    pad = np.arange(D.BEAT_LEN)[None, :] >= lengths[:, None]
    assert not record_100.samples[pad].any()
    # 1.2 x a ~0.8 s RR at 125 Hz: around 120 samples.
    assert 100 < np.median(lengths) < 140


def test_aami_mapping_is_the_standard_table():
    assert D.SYMBOL_TO_AAMI["e"] == "N" and D.SYMBOL_TO_AAMI["j"] == "N"
    assert {s for s, c in D.SYMBOL_TO_AAMI.items() if c == "S"} == set("AaJS")
    assert {s for s, c in D.SYMBOL_TO_AAMI.items() if c == "V"} == set("VE")
    assert {s for s, c in D.SYMBOL_TO_AAMI.items() if c == "Q"} == set("/fQ")
    for not_a_beat in '+~!"x|[]':
        assert not_a_beat not in D.SYMBOL_TO_AAMI


def test_lead_is_chosen_by_name(data_dir):
    # Record 114 has MLII as its second channel; 102 has no MLII at all.
    signal, fs = D.read_lead("114", data_dir, "MLII")
    record = wfdb.rdrecord(str(data_dir / "114"))
    assert record.sig_name.index("MLII") == 1
    assert np.allclose(signal, record.p_signal[:, 1]) and fs == 360
    with pytest.raises(D.DataNotFoundError, match="no MLII"):
        D.read_lead("102", data_dir, "MLII")


def test_inter_patient_split_is_de_chazal():
    assert len(D.DS1) == len(D.DS2) == 22
    assert not set(D.DS1) & set(D.DS2)
    assert not set(D.PACED) & (set(D.DS1) | set(D.DS2))
    assert "208" in D.DS1 and "213" in D.DS2  # where almost all F beats come from


def test_intra_patient_split_is_disjoint(record_100):
    train, test = D.intra_patient_split(record_100, 0.2, seed=1)
    assert len(set(train) & set(test)) == 0
    assert len(train) + len(test) == len(record_100)
    assert abs(len(test) - 0.2 * len(record_100)) <= 1


def test_kaggle_csv_round_trip(tmp_path, record_100):
    beats = record_100.subset(np.arange(50))
    rows = np.column_stack([beats.samples, beats.label])
    path = tmp_path / "mitbih_test.csv"
    np.savetxt(path, rows, delimiter=",", fmt="%.9e")
    loaded = D.load_kaggle_csv(path)
    assert np.allclose(loaded.samples, beats.samples)
    assert (loaded.label == beats.label).all()
    # The last non-zero sample marks the end of the signal (a beat may end on a true zero).
    assert (loaded.length <= beats.length).all() and (loaded.length >= beats.length - 3).all()


def test_kaggle_csv_rejects_wrong_shape(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("0.1,0.2,0\n")
    with pytest.raises(ValueError, match="expected 188 columns"):
        D.load_kaggle_csv(path)


def test_ecg5000_loader(ecg5000_dir):
    x, y = D.load_ecg5000(ecg5000_dir, "TRAIN")
    assert x.shape == (500, 140)
    assert (y == 1).sum() == 292
    x, y = D.load_ecg5000(ecg5000_dir, "TEST")
    assert x.shape == (4500, 140) and (y == 1).sum() == 2627


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(D.DataNotFoundError, match="not found"):
        D.locate_database("mitdb", tmp_path, ["100"])


def test_download_path_uses_wfdb(tmp_path, monkeypatch, data_dir):
    """No internet here: the PhysioNet download is mocked, everything around it is real."""
    calls = []

    def fake_dl_database(name, dl_dir, records):
        calls.append((name, list(records)))
        for record in records:
            for ext in ("hea", "dat", "atr"):
                (tmp_path / "cache" / name / f"{record}.{ext}").write_bytes(
                    (data_dir / f"{record}.{ext}").read_bytes()
                )

    monkeypatch.setenv("ECG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(wfdb, "dl_database", fake_dl_database)
    found = D.locate_database("mitdb", "", ["100"], download=True)
    assert found == tmp_path / "cache" / "mitdb"
    assert calls == [("mitdb", ["100"])]
    assert len(D.extract_beats("100", found)) == 2273
    # Second call: served from the cache, no download.
    assert D.locate_database("mitdb", "", ["100"]) == found and len(calls) == 1


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    def offline(*_a, **_k):
        raise ConnectionError("no route to host")

    monkeypatch.setenv("ECG_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(wfdb, "dl_database", offline)
    with pytest.raises(D.DataNotFoundError, match="cannot download mitdb"):
        D.locate_database("mitdb", "", ["100"])
