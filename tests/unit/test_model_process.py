"""The model served from its own process: same answers as in-process, clear failures, and a
worker I/O side that never loads torch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from models import masks
from models.batches import ModelBatch
from models.model import repair, unknown_context
from models.rhythm import UNKNOWN as RHYTHM_UNKNOWN
from stream.engine import Engine, _faster, padded_rows
from stream.model_process import ModelProcess, ModelProcessError


def _batch(record_100, n=64) -> ModelBatch:
    """n beats of record 100 with gaps, each the first beat of a new patient."""
    beats = record_100.subset(np.arange(n))
    rng = np.random.default_rng(3)
    missing = masks.mask_batch(masks.training_mask, rng, beats.length, beats.samples.shape[1])
    slots = np.arange(n)
    rhythm = np.tile(RHYTHM_UNKNOWN, (n, 1))
    return ModelBatch(slots, slots.tolist(), beats.samples, missing, beats.length, slots, rhythm)


def test_each_batch_size_is_served_by_the_runtime_measured_faster(checkpoint, record_100):
    """auto: both runtimes run every padded size in the warm-up and the faster serves it; they
    answer alike (float rounding), and neither changes an observed sample. ONNX Runtime is a
    dependency: auto must have it (its fallback to TorchScript alone is for broken installs)."""
    engine = Engine.load(checkpoint, threads=1, max_batch=32)
    assert set(engine.passes) == {"torchscript", "onnx"}
    assert sorted(engine.chosen) == [1, 2, 4, 8, 16, 24, 32]
    assert set(engine.chosen.values()) <= {"torchscript", "onnx"}
    engine.chosen = {1: "onnx", 2: "onnx", 4: "torchscript", 8: "onnx"}  # a start-up log line
    assert engine.describe_runtimes() == "onnx 1-2, torchscript 4, onnx 8"
    batch = _batch(record_100, 24)
    args = (batch.beats, batch.missing, batch.beats, batch.lengths)
    args += (np.full_like(batch.beats, np.nan), unknown_context(24))
    by = {name: run(*args) for name, run in engine.passes.items()}
    np.testing.assert_allclose(by["onnx"].samples, by["torchscript"].samples, atol=1e-5)
    np.testing.assert_allclose(by["onnx"].probabilities, by["torchscript"].probabilities, atol=1e-5)
    np.testing.assert_allclose(by["onnx"].anomaly_score, by["torchscript"].anomaly_score, atol=1e-5)
    observed = ~batch.missing
    for result in by.values():
        assert np.array_equal(result.samples[observed], batch.beats[observed])
    only = Engine.load(checkpoint, threads=1, max_batch=8, runtime="torchscript")
    assert set(only.passes) == {"torchscript"} and set(only.chosen.values()) == {"torchscript"}
    pinned = Engine.load(checkpoint, threads=1, max_batch=8, runtime="onnx")
    assert set(pinned.passes) == {"onnx"} and set(pinned.chosen.values()) == {"onnx"}


def test_onnx_runtime_serves_a_size_only_where_it_is_clearly_faster():
    """Near a tie TorchScript keeps the size, so warm-up noise does not flip sizes back and
    forth between runtimes; ONNX Runtime takes it when it is clearly faster or alone."""
    assert _faster({"torchscript": 1.0, "onnx": 0.5}) == "onnx"
    assert _faster({"torchscript": 1.0, "onnx": 0.97}) == "torchscript"
    assert _faster({"torchscript": 1.0, "onnx": 1.5}) == "torchscript"
    assert _faster({"torchscript": 1.0}) == "torchscript"
    assert _faster({"onnx": 1.0}) == "onnx"


def test_model_process_answers_like_the_in_process_engine(checkpoint, record_100):
    # One runtime for every size on both sides (auto may pick differently per process)
    local = Engine.load(checkpoint, threads=1, runtime="onnx")
    with ModelProcess(checkpoint, threads=1, runtime="onnx") as remote:
        remote.wait_ready()
        assert (remote.version, remote.threshold) == (local.version, local.threshold)
        # Both measured their own pass in the warm-up (what the worker logs and exports).
        assert local.throughput > 100 and remote.throughput > 100
        for model in (local, remote):  # what the worker relies on (stream.model_api)
            assert {"version", "threshold", "throughput"} <= set(vars(model))
            assert callable(model.submit)
        for n in (1, 64):
            batch = _batch(record_100, n)
            want, got = local.serve(batch), remote.serve(batch)
            assert np.array_equal(got.samples, want.samples)
            assert np.array_equal(got.probabilities, want.probabilities)
            assert np.array_equal(got.anomaly_score, want.anomaly_score)
            observed = ~batch.missing
            assert np.array_equal(got.samples[observed], batch.beats[observed])


def test_the_engine_runs_a_few_padded_sizes_and_answers_for_the_real_rows(
    checkpoint, record_100, monkeypatch
):
    """Batches run at 1, 2, 4, 8 or a multiple of 8 rows (the sizes warmed up at load, so no
    real batch pays for a new shape); the answer covers the real rows only and matches an
    unpadded pass to float rounding, observed samples untouched."""
    sizes = [padded_rows(n) for n in (0, 1, 2, 3, 5, 8, 9, 16, 17, 255, 256, 257)]
    assert sizes == [0, 1, 2, 4, 8, 8, 16, 16, 24, 256, 256, 264]
    engine = Engine.load(checkpoint, threads=1, max_batch=16)
    batch = _batch(record_100, 13)
    args = (batch.beats, batch.missing, batch.beats, batch.lengths)  # the beat as its template
    want = repair(engine.runner, *args)
    passes = []

    def counted(run):
        def pass_(beats, *rest):
            passes.append(len(beats))
            return run(beats, *rest)

        return pass_

    monkeypatch.setattr(engine, "passes", {k: counted(v) for k, v in engine.passes.items()})
    got = engine.repair(*args)
    assert passes == [16]  # 13 beats run as 16 rows
    assert got.samples.shape == batch.beats.shape and got.anomaly_score.shape == (13,)
    np.testing.assert_allclose(got.samples, want.samples, atol=1e-5)
    np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-5)
    np.testing.assert_allclose(got.anomaly_score, want.anomaly_score, rtol=1e-4, atol=1e-6)
    observed = ~batch.missing
    assert np.array_equal(got.samples[observed], batch.beats[observed])


def test_served_batches_keep_each_patients_history_beside_the_model(checkpoint, record_100):
    """`serve` (templates + pass) gives the same results in both places, batch after batch,
    also when the batches are submitted back to back (answered in order); unrecoverable rows
    join the history without a pass, and a fresh slot starts over."""
    local = Engine.load(checkpoint, threads=1)
    first = _batch(record_100, 48)
    beats, missing, lengths = first.beats, first.missing, first.lengths
    slots = np.arange(48) % 3  # three interleaved patients
    with ModelProcess(checkpoint, threads=1) as remote:
        remote.wait_ready()
        batches = [
            ModelBatch(
                slots[start : start + 16],
                fresh,
                beats[start : start + 16],
                missing[start : start + 16],
                lengths[start : start + 16],
                np.arange(1, 16),
                np.tile(RHYTHM_UNKNOWN, (16, 1)),
            )
            for start, fresh in ((0, [0, 1, 2]), (16, []), (32, [1]))
        ]
        answers = [remote.submit(batch) for batch in batches]
        for batch, answer in zip(batches, answers):
            want, got = local.serve(batch), answer.result(timeout=60)
            assert got.samples.shape[0] == 15 and got.seconds > 0
            assert np.array_equal(got.samples, want.samples)
            assert np.array_equal(got.probabilities, want.probabilities)
        nothing = ModelBatch(
            slots[:1], [], beats[:1], missing[:1], lengths[:1], np.arange(0), RHYTHM_UNKNOWN[None]
        )
        assert remote.serve(nothing) is None and local.serve(nothing) is None
    # Fresh slot 1 forgot what came before the third batch: a next beat's template is the
    # one a new store holding only the third batch's beats of slot 1 gives.
    third = np.flatnonzero(slots == 1)
    third = third[third >= 32]
    alone = local.template.store(beats.shape[1])
    alone.advance(np.zeros(len(third), int), beats[third], missing[third], lengths[third])
    want = alone.advance([0], beats[:1], missing[:1], lengths[:1])
    got = local.templates.advance([1], beats[:1], missing[:1], lengths[:1])
    assert np.array_equal(got, want, equal_nan=True) and not np.isnan(got).all()


def test_a_bad_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ModelProcess(tmp_path / "missing.pt")  # refused before any process starts
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    with ModelProcess(bad) as remote, pytest.raises(ModelProcessError, match="cannot load"):
        remote.wait_ready()


def test_a_dead_model_process_stops_the_caller(checkpoint, record_100):
    with ModelProcess(checkpoint) as remote:
        remote.wait_ready()
        batch = _batch(record_100, 4)
        remote.serve(batch)
        unanswered = remote.submit(_batch(record_100, 512))
        os.kill(remote.pid, signal.SIGKILL)
        with pytest.raises(ModelProcessError, match="died"):
            unanswered.result(timeout=30)
        with pytest.raises(ModelProcessError, match="died"):
            remote.serve(batch)


def test_the_model_process_ignores_ctrl_c_and_ends_with_its_pipe(checkpoint, record_100):
    """SIGINT reaches the whole process group; the worker finishes its batches in flight,
    so the model must outlive the signal and end only when the worker closes the pipe."""
    remote = ModelProcess(checkpoint).wait_ready()
    os.kill(remote.pid, signal.SIGINT)
    assert remote.serve(_batch(record_100, 4)).samples.shape[0] == 4
    remote.close()
    assert remote._process.exitcode == 0


def test_the_worker_io_side_never_imports_torch():
    code = (
        "import sys\n"
        "import stream.cli, stream.worker, stream.processor, stream.model_process\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
