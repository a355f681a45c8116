"""Patient context: RR features and morphology features, the same in training and in the worker."""

from __future__ import annotations

import numpy as np
import pytest

from models import masks
from models.rhythm import (
    FEATURES,
    MAX_RR_S,
    N_FEATURES,
    RhythmState,
    sequence_features,
)
from models.templates import TemplateSpec
from models.train import beat_context
from stream import messages
from stream.state import PatientRegistry

CLOCK = 1.7e9  # a device's UNIX clock at the start of the record


def _admit(registry: PatientRegistry, partition: int, seq: int, timestamp: float, samples):
    raw = messages.raw_beat("p1", seq, timestamp, samples, np.zeros(len(samples), bool))
    beat = messages.decode_raw(messages.dumps(raw), b"p1", 65536)
    return registry.admit(partition, beat)


def test_rr_features_follow_the_definition():
    state = RhythmState()
    first, rr = state.observe(10.0)
    assert rr is None and first[0] == 0 and state.heart_rate_bpm() is None
    for t in (11.0, 12.0):
        state.observe(t)
    features, rr = state.observe(12.5)  # premature: half the usual interval
    assert rr == pytest.approx(0.5)
    known, pre_rr, vs_local, vs_last, local_vs_long, history, vs_long, irregular, share = features
    assert (known, pre_rr, vs_local, vs_last) == pytest.approx((1, 0.5, 0.5, 0.5))
    assert local_vs_long == pytest.approx(1.0) and history == pytest.approx(2 / 32)
    assert vs_long == pytest.approx(0.5) and irregular == pytest.approx(0.0)
    assert share == 0.0  # too few intervals to measure
    assert state.heart_rate_bpm() == pytest.approx(60 * 3 / 2.5)
    after_gap, rr = state.observe(13.5, after_gap=True)
    assert rr is None and after_gap[0] == 0 and after_gap[2] == 1.0  # unknown, not invented
    long_pause, rr = state.observe(13.5 + MAX_RR_S + 0.1)
    assert rr is None and long_pause[0] == 0


def test_the_irregular_share_sees_fibrillation_not_pauses():
    """AF's intervals differ beat to beat; a regular rhythm with pauses differs only around
    each pause, which the share leaves out."""
    rng = np.random.default_rng(0)
    shares = {}
    for name, rr in {
        "regular": np.full(40, 0.8),
        "fibrillation": rng.uniform(0.4, 1.2, 40),
        "pauses": np.where(np.arange(40) % 4 == 3, 2.0, 0.8),  # a 2 s pause every 4th beat
    }.items():
        state = RhythmState()
        for t in np.concatenate([[0.0], np.cumsum(rr)]):
            features, _ = state.observe(float(t))
        shares[name] = features[FEATURES.index("irregular_share")]
    assert shares["regular"] == 0.0 and shares["pauses"] == 0.0
    assert shares["fibrillation"] > 0.7


def test_the_worker_computes_the_training_features_for_the_same_beats(record_100):
    """Beats of record 100 streamed through the worker's registry (R-peak timestamps, lost
    beats, a rebalance that drops the state) and template store (batches of mixed sizes)
    give the features training computes from the annotation times with the same events."""
    n = 400
    beats = record_100.subset(np.arange(n))
    missing = masks.mask_batch(
        masks.training_mask, np.random.default_rng(1), beats.length, beats.samples.shape[1]
    )
    lost = {50, 51, 203}  # never sent: the beat after them follows a sequence gap
    reset_at = 260  # the partition moves away and back: the state starts afresh here
    sent = np.array([i for i in range(n) if i not in lost])
    after_gap = np.isin(sent, [52, 204])
    starts = sent == reset_at
    spec = TemplateSpec(40, 8)
    want = beat_context(spec, beats.subset(sent), missing[sent], starts, after_gap)

    registry = PatientRegistry()
    store = spec.store(beats.samples.shape[1])
    got_rhythm, got_morph = [], []
    batch: list[tuple[int, object]] = []

    def serve():  # the model side sees a batch: every beat's template context
        idx = np.array([i for i, _ in batch])
        context = store.advance_context(
            [a.slot for _, a in batch],
            beats.samples[idx],
            missing[idx],
            beats.length[idx],
            [a.slot for _, a in batch if a.new],
        )
        got_morph.append(context.morph)
        batch.clear()

    for i in sent:
        if i == reset_at:  # a rebalance happens between polls, so between batches
            serve()
            registry.drop_partitions([0])
        admitted = _admit(registry, 0, int(i), CLOCK + float(beats.time[i]), beats.samples[i])
        assert (admitted.lost > 0) == (i in (52, 204))
        got_rhythm.append(admitted.rhythm)
        batch.append((i, admitted))
        if len(batch) == 37:
            serve()
    serve()
    rhythm = np.array(got_rhythm)
    # The device clock's offset costs float64 digits only: far below the features' float32.
    np.testing.assert_allclose(rhythm, want.features[:, : rhythm.shape[1]], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate(got_morph), want.features[:, rhythm.shape[1] :])
    unknown = rhythm[:, 0] == 0
    assert unknown[[0, np.flatnonzero(after_gap)[0], np.flatnonzero(starts)[0]]].all()
    assert unknown.sum() == 4  # the first beat, two after gaps, the first after the reset
    assert (want.features[sent >= 20, N_FEATURES] == 1).mean() > 0.9  # morphology known


def test_lost_beats_and_resets_give_unknown_rr():
    registry = PatientRegistry()
    samples = np.linspace(0, 1, 100)
    first = _admit(registry, 3, 0, 100.0, samples)
    assert first.new and first.rr_s is None and first.heart_rate_bpm is None
    second = _admit(registry, 3, 1, 100.8, samples)
    assert second.rr_s == pytest.approx(0.8) and second.heart_rate_bpm == pytest.approx(75)
    after_loss = _admit(registry, 3, 4, 103.2, samples)  # seq 2 and 3 never arrived
    assert after_loss.lost == 2 and after_loss.rr_s is None and after_loss.rhythm[0] == 0
    assert after_loss.heart_rate_bpm == pytest.approx(75)  # the known intervals still stand
    assert _admit(registry, 3, 5, 104.0, samples).rr_s == pytest.approx(0.8)
    registry.drop_partitions([3])  # a rebalance took the partition away, then gave it back
    reset = _admit(registry, 3, 6, 104.8, samples)
    assert reset.new and reset.rr_s is None and reset.heart_rate_bpm is None


def test_sequence_features_start_afresh_at_each_start():
    times = np.array([0.0, 1.0, 2.0, 0.5, 1.5])
    features = sequence_features(times, np.zeros(5, bool), np.array([1, 0, 0, 1, 0], bool))
    assert features[:, 0].tolist() == [0, 1, 1, 0, 1]
    assert features[4, 1] == pytest.approx(1.0) and features[4, 5] == 0  # no history yet
