"""Networks, gap fillers, templates and checkpoints."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from models import baselines as B
from models import data as D
from models import masks
from models import templates as T
from models.config import TrainConfig
from models.model import (
    CheckpointError,
    EcgNet,
    NetConfig,
    load_checkpoint,
    premature_supraventricular,
    repair,
    save_checkpoint,
    single_channel_conv,
    trace_repair,
)
from models.rhythm import FEATURES, UNKNOWN
from models.train import epoch_masks, train


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
    template = T.running_templates(beats.samples, missing, beats.record)
    for filled in (
        B.zero_fill(beats.samples, missing),
        B.linear_fill(beats.samples, missing),
        B.spline_fill(beats.samples, missing),
        B.template_fill(beats.samples, missing, template),
    ):
        assert np.array_equal(filled[~missing], beats.samples[~missing])


def test_stream_mean_template_matches_the_vectorised_one(record_100):
    beats = record_100.subset(np.arange(120))
    missing = masked(beats, seed=3)
    expected = T.running_templates(beats.samples, missing, beats.record, k=20)
    store = T.TemplateSpec(beats=20).store(beats.samples.shape[1])
    slot = 5
    for i in range(len(beats)):  # one beat at a time, as a worker may see them
        got = store.advance([slot], beats.samples[i : i + 1], missing[i : i + 1], [180])
        assert np.allclose(got[0], expected[i], atol=1e-5, equal_nan=True)


def test_template_store_batches_agree_with_beat_by_beat(record_100):
    """Batches that interleave patients and repeat one within a batch (as a worker's
    micro-batches do) give the same templates as feeding the beats one at a time."""
    beats = record_100.subset(np.arange(90))
    missing = masked(beats, seed=5)
    patient = np.arange(90) % 3  # three interleaved patients
    spec = T.TemplateSpec(beats=10, matches=3)
    one_by_one = spec.store(187)
    slots = [0, 1, 2]
    expected = np.concatenate(
        [
            one_by_one.advance([slots[p]], beats.samples[i : i + 1], missing[i : i + 1], [150])
            for i, p in enumerate(patient)
        ]
    )
    batched = spec.store(187)
    got = np.concatenate(
        [
            batched.advance(
                [slots[p] for p in patient[s : s + 16]],
                beats.samples[s : s + 16],
                missing[s : s + 16],
                np.full(16, 150)[: len(patient[s : s + 16])],
            )
            for s in range(0, 90, 16)
        ]
    )
    assert np.array_equal(got, expected, equal_nan=True)
    # A slot handed to a new patient forgets the old patient's history.
    fresh = batched.advance([slots[0]], beats.samples[:1], missing[:1], [150], fresh=[slots[0]])
    assert np.isnan(fresh).all()
    # Growing past the initial capacity keeps every patient's history.
    before = batched.history[slots[1]].copy()
    beyond = T.TemplateStore.INITIAL_SLOTS + 100
    batched.advance([beyond], beats.samples[:1], missing[:1], [150], fresh=[beyond])
    assert len(batched.seen) == 2 * T.TemplateStore.INITIAL_SLOTS
    assert np.array_equal(batched.history[slots[1]], before)


@pytest.mark.parametrize("spec", [T.TemplateSpec(), T.TemplateSpec(beats=40, matches=8)])
def test_templates_never_use_the_future(record_100, spec):
    beats = record_100.subset(np.arange(60))
    missing = masked(beats, seed=1)
    before = spec.batch(beats.samples, missing, beats.length, beats.record)
    changed = beats.samples.copy()
    changed[30:] = 0.5
    after = spec.batch(changed, missing, beats.length, beats.record)
    assert np.array_equal(before[:30], after[:30], equal_nan=True)
    assert not np.array_equal(before[31:], after[31:], equal_nan=True)
    assert np.isnan(before[0]).all()  # a patient's first beat has no template yet
    hidden = np.where(missing, 0.5, beats.samples)  # what was never received cannot leak
    assert np.array_equal(before, spec.batch(hidden, missing, beats.length, beats.record), True)


def brute_force_matched(beats, missing, lengths, i, k, m):
    """The matched template of beat i, spelled out with loops (a reference for the tracker)."""
    width = beats.shape[1]
    usable = [~missing[j] & (np.arange(width) < lengths[j]) for j in range(i + 1)]
    scored = []
    for age, j in enumerate(range(i - 1, max(i - k, 0) - 1, -1)):
        both = usable[i] & usable[j]
        if both.sum() < T.MIN_OVERLAP:
            continue
        offset = np.mean(beats[i, both] - beats[j, both])
        distance = np.mean((beats[i, both] - beats[j, both] - offset) ** 2)
        scored.append((distance, age, j, offset))
    chosen = sorted(scored)[:m]
    total, count = np.zeros(width), np.zeros(width)
    for _, _, j, offset in chosen:
        total += np.where(usable[j], beats[j] + offset, 0.0)
        count += usable[j]
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def test_matched_template_agrees_with_a_brute_force_reference(record_100):
    beats = record_100.subset(np.arange(70))
    missing = masked(beats, seed=4)
    spec = T.TemplateSpec(beats=12, matches=3)
    got = spec.batch(beats.samples, missing, beats.length, beats.record)
    for i in (1, 2, 5, 13, 40, 69):
        expected = brute_force_matched(beats.samples, missing, beats.length, i, 12, 3)
        assert np.allclose(got[i], expected, atol=1e-4, equal_nan=True), i


@pytest.mark.parametrize("seed", range(5))
def test_nanmedian_last_is_numpys_nanmedian_value_for_value(seed):
    """The morphology scales' median gives numpy's values exactly, so the features (and the
    trained weights) do not move with it: odd and even counts, all-NaN and full rows."""
    rng = np.random.default_rng(seed)
    a = (rng.random((300, 2, 40)) ** 3 * rng.choice([1e-3, 1.0, 50.0], (300, 2, 1))).astype(
        np.float32
    )
    a[rng.random(a.shape) < rng.random((300, 1, 1))] = np.nan
    a[0] = np.nan
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):  # the all-NaN rows
        expected = np.nanmedian(a, axis=2)
    got = T.nanmedian_last(a)
    assert got.dtype == np.float32
    assert np.array_equal(got, expected, equal_nan=True)


def test_matched_template_finds_the_patients_earlier_ectopic_beats():
    width = 60
    t = np.linspace(0, 1, width)
    normal, ectopic = np.sin(np.pi * t), np.sin(3 * np.pi * t) * 0.8 + 0.1
    history = [normal] * 9 + [ectopic + 0.2] + [normal] * 9  # one earlier ectopic, shifted
    beats = np.array([*history, ectopic], np.float32)
    missing = np.zeros(beats.shape, bool)
    missing[-1, 20:40] = True  # the new ectopic beat loses a third
    spec = T.TemplateSpec(beats=20, matches=1)
    matched = spec.batch(beats, missing, np.full(len(beats), width), np.zeros(len(beats)))
    mean = T.running_templates(beats, missing, np.zeros(len(beats)))
    gap = missing[-1]
    assert np.allclose(matched[-1, gap], ectopic[gap], atol=1e-5)  # the offset is removed
    assert np.abs(mean[-1, gap] - ectopic[gap]).max() > 0.5


def test_matched_templates_fill_gaps_better_than_the_mean_template(data_dir):
    beats = D.load_beats(["119"], data_dir)  # ventricular bigeminy: a mean blurs two shapes
    rng = np.random.default_rng(0)
    missing = masks.mask_batch(masks.contiguous_gap, rng, beats.length, beats.samples.shape[1])
    args = (beats.samples, missing, beats.length, beats.record)
    errors = {}
    for name, spec in {"mean": T.TemplateSpec(), "matched": T.TemplateSpec(40, 8)}.items():
        filled = B.template_fill(beats.samples, missing, spec.batch(*args))
        errors[name] = np.sqrt(np.mean((filled - beats.samples)[missing] ** 2))
    assert errors["matched"] < 0.9 * errors["mean"], errors


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
    template = net.config.template.batch(beats.samples, missing, beats.length, beats.record)
    out = repair(net, beats.samples, missing, template, beats.length)
    assert np.array_equal(out.samples[~missing], beats.samples[~missing])
    assert not np.allclose(out.samples[missing], 0)  # gaps really are filled
    assert np.allclose(out.probabilities.sum(1), 1, atol=1e-5)
    assert (out.anomaly_score >= 0).all()
    traced = trace_repair(net)  # what the worker serves: the same pass, any batch size
    for rows in (slice(0, 1), slice(0, 7), slice(0, 512)):
        served = repair(
            traced, beats.samples[rows], missing[rows], template[rows], beats.length[rows]
        )
        observed = ~missing[rows]
        assert np.array_equal(served.samples[observed], beats.samples[rows][observed])
        assert np.allclose(served.samples, out.samples[rows], atol=1e-5)
        assert np.allclose(served.probabilities, out.probabilities[rows], atol=1e-6)
        assert np.allclose(served.anomaly_score, out.anomaly_score[rows], rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 8, 256])
def test_single_channel_conv_is_the_convolution(rows):
    """The inference form of the refiner's last convolution gives conv1d's output up to float
    rounding, so serving it moves no fill beyond that."""
    torch.manual_seed(rows)
    conv = torch.nn.Conv1d(16, 1, 9, padding=4)
    x = torch.randn(rows, 16, 187)
    with torch.no_grad():
        expected = conv(x).squeeze(1)
        got = single_channel_conv(x, conv.weight, conv.bias)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)


def test_observed_neighbours_are_the_running_max_and_min_of_observed_positions():
    """The linear fill's neighbours, computed without a scan op (ONNX has none), are the
    running max / min of the observed positions: the same fill bit for bit."""
    rng = np.random.default_rng(4)
    missing = torch.from_numpy(rng.random((400, 187)) < rng.random((400, 1)))
    missing[0], missing[1] = True, False  # nothing observed, everything observed
    pos = torch.arange(187).expand_as(missing)
    prev, nxt = B.observed_neighbours(missing)
    assert torch.equal(prev, torch.where(~missing, pos, -1).cummax(1).values)
    assert torch.equal(nxt, torch.where(~missing, pos, 187).flip(1).cummin(1).values.flip(1))


def test_onnx_export_is_cached_per_network(tmp_path, monkeypatch):
    """A network is exported once per cache; another network (other weights) is exported
    again; a cached graph answers as the exported one did."""
    from models import onnx_pass

    net = EcgNet(NetConfig(beat_len=64, patch=8, hidden=8, refine=4, context=True))
    exports = []
    real = onnx_pass.export_repair
    monkeypatch.setattr(onnx_pass, "export_repair", lambda n: exports.append(1) or real(n))
    first = onnx_pass.cached_export(net, tmp_path)
    assert onnx_pass.cached_export(net, tmp_path) == first and len(exports) == 1
    torch.nn.init.zeros_(net.gap_head.bias)
    with torch.no_grad():
        net.gap_head.bias += 1.0
    assert onnx_pass.cached_export(net, tmp_path) != first and len(exports) == 2
    beats = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    missing = np.zeros(beats.shape, bool)
    missing[:, 20:30] = True
    args = (beats, missing, beats, np.full(3, 64), beats, np.zeros((3, 13), np.float32))
    served = onnx_pass.OnnxRepair(net, model=onnx_pass.cached_export(net, tmp_path))(*args)
    np.testing.assert_allclose(served.samples, repair(net, *args).samples, atol=1e-5)
    assert np.array_equal(served.samples[~missing], beats[~missing])


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


@pytest.mark.parametrize("block,gap", [(1.0, 0.0), (0.0, 1.0)])
def test_persistent_losses_take_the_same_samples_from_every_beat_of_a_record(
    record_100, block, gap
):
    """train.persistent_block / persistent_gap: a record drawn for it loses the block (or one
    random stretch) in every beat, so its templates never see those samples either."""
    beats = record_100.subset(np.arange(300))
    cfg = TrainConfig(persistent_block=block, persistent_gap=gap)
    missing, _ = epoch_masks(np.random.default_rng(0), beats, T.TemplateSpec(), cfg)
    reach = np.arange(D.BEAT_LEN)[None, :] < beats.length[:, None]
    lost_everywhere = [
        c for c in range(D.BEAT_LEN) if reach[:, c].any() and missing[reach[:, c], c].all()
    ]
    if block:
        assert np.array_equal(missing[:, 100:138], reach[:, 100:138])
    assert lost_everywhere  # random dropout alone never takes one sample from 300 beats
    assert not (missing & ~reach).any()


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


def test_the_prematurity_rule_calls_early_normal_beats_s_outside_fibrillation():
    """Early against the recent or the longer-term RR: S; the same beat while the rhythm is as
    irregular as AF's: the class head's verdict. Only the N/S split moves."""
    config = NetConfig(premature_ratio=0.8, premature_long_ratio=0.85, premature_af_share=0.55)
    head = torch.tensor([[0.7, 0.1, 0.15, 0.05, 0.0]]).repeat(5, 1)
    rhythm = np.tile(UNKNOWN, (5, 1))
    rhythm[:, FEATURES.index("rr_known")] = 1
    col = {name: FEATURES.index(name) for name in FEATURES}
    rhythm[0, [col["pre_rr_vs_local"], col["pre_rr_vs_long"]]] = 1.0, 1.0  # on time
    rhythm[1, [col["pre_rr_vs_local"], col["pre_rr_vs_long"]]] = 0.6, 0.6  # early
    rhythm[2, [col["pre_rr_vs_local"], col["pre_rr_vs_long"]]] = 0.95, 0.7  # an atrial run
    rhythm[3, [col["pre_rr_vs_local"], col["pre_rr_vs_long"]]] = 0.6, 0.6
    rhythm[3, col["irregular_share"]] = 0.8  # ... in fibrillation
    rhythm[4] = UNKNOWN  # no RR: nothing to say
    out = premature_supraventricular(head, torch.from_numpy(rhythm), config)
    assert out.argmax(1).tolist() == [0, 1, 1, 0, 0]
    assert torch.allclose(out[:, 2:], head[:, 2:]) and torch.allclose(out.sum(1), head.sum(1))
    assert torch.allclose(out[[0, 3, 4]], head[[0, 3, 4]], atol=1e-3)
