"""Networks, gap fillers, templates and checkpoints."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from models import baselines as B
from models import masks
from models.config import TrainConfig
from models.model import (
    CheckpointError,
    EcgNet,
    NetConfig,
    load_checkpoint,
    repair,
    save_checkpoint,
)
from models.train import train


def masked(beats, seed=0):
    rng = np.random.default_rng(seed)
    return masks.mask_batch(masks.training_mask, rng, beats.length, beats.samples.shape[1])


def test_linear_fill_interpolates_and_holds_edges():
    beat = np.array([[0.0, 9, 9, 3.0, 9, 5.0, 9]], np.float32)
    missing = np.array([[True, True, False, False, True, False, True]])
    beat[0, 2] = 1.0
    filled = B.linear_fill(beat, missing)
    assert filled.tolist() == [[1.0, 1.0, 1.0, 3.0, 4.0, 5.0, 5.0]]


def test_fillers_change_only_missing_samples(record_100):
    beats = record_100.subset(np.arange(300))
    missing = masked(beats)
    template = B.running_templates(beats.samples, missing, beats.record)
    for filled in (
        B.zero_fill(beats.samples, missing),
        B.linear_fill(beats.samples, missing),
        B.spline_fill(beats.samples, missing),
        B.template_fill(beats.samples, missing, template),
    ):
        assert np.array_equal(filled[~missing], beats.samples[~missing])


def test_stream_template_tracker_matches_training_templates(record_100):
    beats = record_100.subset(np.arange(120))
    missing = masked(beats, seed=3)
    expected = B.running_templates(beats.samples, missing, beats.record, k=20)
    tracker = B.TemplateTracker(beats.samples.shape[1], k=20)
    for i in range(len(beats)):
        assert np.allclose(tracker.template(), expected[i], atol=1e-5, equal_nan=True)
        tracker.add(beats.samples[i], missing[i])


def test_templates_never_use_the_future(record_100):
    beats = record_100.subset(np.arange(40))
    missing = np.zeros_like(beats.samples, bool)
    before = B.running_templates(beats.samples, missing, beats.record)
    changed = beats.samples.copy()
    changed[30:] = 0.5
    after = B.running_templates(changed, missing, beats.record)
    assert np.array_equal(before[:31], after[:31], equal_nan=True)
    assert np.isnan(before[0]).all()  # a patient's first beat has no template yet


def test_masks_stay_inside_the_signal():
    rng = np.random.default_rng(0)
    for fn in (masks.training_mask, masks.contiguous_gap, masks.bursty, masks.sample_drops):
        for length in (5, 60, 187):
            m = fn(rng, length, 187)
            assert m.shape == (187,) and not m[length:].any()
    assert masks.block(120, 187).sum() == 20 and masks.block(90, 187).sum() == 0


def test_repair_never_changes_an_observed_sample(checkpoint, record_100):
    net, _ = load_checkpoint(checkpoint)
    beats = record_100.subset(np.arange(512))
    missing = masked(beats, seed=5)
    template = B.running_templates(beats.samples, missing, beats.record)
    out = repair(net, beats.samples, missing, template, beats.length)
    assert np.array_equal(out.samples[~missing], beats.samples[~missing])
    assert not np.allclose(out.samples[missing], 0)  # gaps really are filled
    assert np.allclose(out.probabilities.sum(1), 1, atol=1e-5)
    assert (out.anomaly_score >= 0).all()


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    net = EcgNet(NetConfig(hidden=16, latent=4)).eval()
    path = tmp_path / "net.pt"
    meta = {"version": "test", "anomaly_threshold": np.float64(0.5), "history": [{"a": 1.0}]}
    save_checkpoint(path, net, meta)
    loaded, loaded_meta = load_checkpoint(path)
    assert loaded.config == net.config and loaded_meta["anomaly_threshold"] == 0.5
    x = torch.rand(3, 187)
    zeros = torch.zeros(3, 187)
    for a, b in zip(net(x, zeros, x, x), loaded(x, zeros, x, x)):
        assert torch.equal(a, b)


class _Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {}, "config": {}, "meta": _Exploit()}, fh)
    with pytest.raises(CheckpointError, match="unsafe"):
        load_checkpoint(path)
    evil = tmp_path / "evil2.pt"
    torch.save({"state_dict": {}, "config": {}, "meta": _Exploit()}, evil)
    with pytest.raises(CheckpointError, match="unsafe"):
        load_checkpoint(evil)


def test_committed_checkpoint_carries_its_description(checkpoint):
    _, meta = load_checkpoint(checkpoint)
    for key in (
        "version",
        "anomaly_threshold",
        "normalisation",
        "training_data",
        "train_config",
        "history",
    ):
        assert key in meta
    assert meta["training_data"]["split"] == "inter"
    assert set(meta["training_data"]["records"]).isdisjoint({"100", "213", "232"})  # DS2


def test_tiny_training_learns_and_is_reproducible(data_dir):
    cfg = TrainConfig(
        records=["100", "101"],
        epochs=2,
        beats_per_epoch=512,
        hidden=16,
        latent=4,
        batch_size=64,
        seed=7,
    )
    net_a, meta_a = train(cfg, data_dir, progress=False)
    net_b, meta_b = train(cfg, data_dir, progress=False)
    assert meta_a["history"] == [
        {**h, "seconds": meta_a["history"][i]["seconds"]} for i, h in enumerate(meta_b["history"])
    ]
    first, last = meta_a["history"][0], meta_a["history"][-1]
    assert last["loss"] < first["loss"]
    assert meta_a["anomaly_threshold"] > 0
