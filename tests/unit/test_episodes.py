"""The rhythm stage's episode rules (`models.episodes`), on beat sequences built to show them."""

from __future__ import annotations

import json
import random

import pytest

from models.episodes import Beat, EpisodeConfig, PatientRhythm


def feed(
    rhythm: PatientRhythm, labels: str, rr: float = 0.8, start_seq: int = 0, t0=100.0, sure=0.9
):
    """Beats with these labels ('-' = unrecoverable) at a fixed RR, each called with
    confidence `sure` (a float, or one per beat); returns the events."""
    events = []
    sure = [sure] * len(labels) if isinstance(sure, float) else sure
    for i, label in enumerate(labels):
        beat = Beat(start_seq + i, t0 + i * rr, None if label == "-" else label, sure[i])
        events += rhythm.observe(beat)
    return events


def kinds(events, type_: str | None = None, updates=False) -> list[tuple[str, str]]:
    """(kind, type) of the events (of one type), without updates unless asked for."""
    return [
        (e.kind, e.episode.type)
        for e in events
        if type_ in (None, e.episode.type) and (updates or e.kind != "update")
    ]


@pytest.fixture
def rhythm():
    return PatientRhythm("p1", EpisodeConfig())


def test_a_couplet_and_a_short_run_come_whole_once_they_end(rhythm):
    events = feed(rhythm, "NNNVVNNNNVVVVNNN", rr=1.0)  # 60 bpm: below the VT rate
    assert kinds(events) == [("close", "ventricular_couplet"), ("close", "ventricular_run")]
    couplet, run = (e.episode for e in events)
    assert (couplet.first_seq, couplet.last_seq, couplet.beats) == (3, 4, 2)
    assert (run.first_seq, run.last_seq, run.beats) == (9, 12, 4)
    assert all(e.whole for e in events)
    assert run.heart_rate_bpm() == pytest.approx(60.0)


def test_ventricular_tachycardia_opens_at_the_third_fast_v_and_closes_at_the_next_beat(rhythm):
    events = feed(rhythm, "NNN" + "V" * 10 + "NN", rr=0.4)  # 150 bpm
    assert kinds(events) == [
        ("open", "ventricular_tachycardia"),
        ("close", "ventricular_tachycardia"),
    ]
    opened, closed = (e.episode for e in events)
    # patient/type/start time in ms: seq 3 at 100 + 3 x 0.4 s
    assert opened.episode_id == closed.episode_id == "p1/ventricular_tachycardia/101200"
    assert (opened.first_seq, opened.last_seq, opened.beats) == (3, 5, 3)
    assert (closed.last_seq, closed.beats) == (12, 10)
    assert closed.end_time == pytest.approx(100 + 12 * 0.4)


def test_v_runs_of_doubtful_calls_are_no_episodes(rhythm):
    """Ventricular tachycardia is a critical alarm: a short run whose V calls are doubtful
    (mean confidence below run_confidence) opens nothing; the beats keep their classes."""
    doubtful = [0.9] * 3 + [0.9, 0.5, 0.6] + [0.9] * 3 + [0.7, 0.6] + [0.9] * 3
    assert feed(rhythm, "NNNVVVNNNVVNNN", rr=0.4, sure=doubtful) == []
    sure = [0.9] * 3 + [0.95, 0.6, 0.9] + [0.9] * 3 + [0.7, 0.9] + [0.9] * 3
    events = feed(PatientRhythm("p2", EpisodeConfig()), "NNNVVVNNNVVNNN", rr=0.4, sure=sure)
    assert kinds(events) == [
        ("open", "ventricular_tachycardia"),
        ("close", "ventricular_tachycardia"),
        ("close", "ventricular_couplet"),
    ]
    assert events[0].episode.confidence == pytest.approx(0.817, abs=1e-3)
    # a long run is evidence enough: ventricular tachycardia at its vt_beats-th V
    events = feed(PatientRhythm("p3", EpisodeConfig()), "NNN" + "V" * 8 + "N", rr=0.4, sure=0.6)
    assert kinds(events) == [
        ("open", "ventricular_tachycardia"),
        ("close", "ventricular_tachycardia"),
    ]
    assert (events[0].episode.beats, events[0].episode.confidence) == (6, 0.6)


def test_a_slow_run_of_six_is_ventricular_tachycardia_too(rhythm):
    events = feed(rhythm, "NN" + "V" * 6 + "N", rr=1.2)
    assert kinds(events) == [
        ("open", "ventricular_tachycardia"),
        ("close", "ventricular_tachycardia"),
    ]


def test_an_unknown_beat_breaks_a_run_rather_than_being_counted_as_v(rhythm):
    events = feed(rhythm, "NNVV-VVNN", rr=1.0)
    assert kinds(events) == [("close", "ventricular_couplet")] * 2


def test_bigeminy_survives_one_missed_v_and_closes_after_two(rhythm):
    events = feed(rhythm, "NN" + "NV" * 5 + "NN" + "NV" * 3 + "NNNNNN")
    assert kinds(events, "ventricular_bigeminy") == [
        ("open", "ventricular_bigeminy"),
        ("close", "ventricular_bigeminy"),
    ]
    opened, closed = (e.episode for e in events if e.episode.type == "ventricular_bigeminy")
    assert opened.first_seq == 3 and opened.last_seq == 7  # the third V of the pattern
    assert closed.last_seq == 19  # the last V that kept the pattern


def test_trigeminy(rhythm):
    events = feed(rhythm, "NNV" * 6 + "NNNNNNNN")
    assert kinds(events, "ventricular_trigeminy") == [
        ("open", "ventricular_trigeminy"),
        ("close", "ventricular_trigeminy"),
    ]
    assert not kinds(events, "ventricular_bigeminy")


def test_atrial_fibrillation_from_irregular_intervals_only(rhythm):
    rng = random.Random(3)
    times, t = [], 0.0
    for i in range(200):
        t += 0.8 if i < 60 or i >= 140 else rng.uniform(0.4, 1.2)
        times.append(t)
    events = []
    for seq, t in enumerate(times):
        events += rhythm.observe(Beat(seq, t, "N", 0.9))
    assert kinds(events, "atrial_fibrillation") == [
        ("open", "atrial_fibrillation"),
        ("close", "atrial_fibrillation"),
    ]
    opened, closed = (
        e.episode for e in events if e.episode.type == "atrial_fibrillation" and e.kind != "update"
    )
    assert times[58] <= opened.start_time <= times[64]  # its first irregular interval
    assert times[136] <= closed.end_time <= times[140]  # its last irregular interval
    assert 0.55 <= opened.confidence <= 1


@pytest.mark.parametrize("ectopic", ["V", "S"])
def test_premature_beats_do_not_look_like_atrial_fibrillation(rhythm, ectopic):
    t, events = 0.0, []
    for seq in range(200):
        label = ectopic if seq % 3 == 2 else "N"  # trigeminy: short-long around each one
        t += 0.5 if label == ectopic else 1.1
        events += rhythm.observe(Beat(seq, t, label, 0.9))
    assert not kinds(events, "atrial_fibrillation")


def test_svta_needs_three_fast_s_beats_and_is_silent_during_atrial_fibrillation(rhythm):
    events = feed(rhythm, "NNNSSSSNN", rr=0.45)
    assert kinds(events, "svta") == [("open", "svta"), ("close", "svta")]
    slow = PatientRhythm("p2", EpisodeConfig())
    assert not kinds(feed(slow, "NNNSSSSNN", rr=0.8), "svta")
    # an irregular rhythm, before the AF test has the intervals to open an episode
    irregular, t, events = PatientRhythm("p3", EpisodeConfig()), 100.0, []
    for seq, label in enumerate("N" * 16 + "SSSS"):
        t += 0.4 if label == "S" else (0.6, 1.0, 0.75, 1.2)[seq % 4]
        events += irregular.observe(Beat(seq, t, label, 0.9))
    assert not kinds(events, "atrial_fibrillation") and not kinds(events, "svta")


def test_bradycardia_and_tachycardia_with_hysteresis(rhythm):
    events = feed(rhythm, "N" * 30, rr=0.8)  # 75 bpm
    events += feed(rhythm, "N" * 30, rr=1.4, start_seq=30, t0=100 + 30 * 0.8)  # 43 bpm
    events += feed(rhythm, "N" * 30, rr=0.8, start_seq=60, t0=200)
    assert kinds(events, "bradycardia") == [("open", "bradycardia"), ("close", "bradycardia")]
    fast = PatientRhythm("p2", EpisodeConfig())
    assert kinds(feed(fast, "N" * 40, rr=0.4), "tachycardia") == [("open", "tachycardia")]


def test_a_pause_is_measured_and_lost_beats_are_signal_loss_not_a_pause(rhythm):
    events = rhythm.observe(Beat(0, 10.0, "N", 0.9)) + rhythm.observe(Beat(1, 13.5, "N", 0.9))
    assert kinds(events) == [("close", "pause")]
    assert events[0].episode.detail == {"rr_s": 3.5}
    events = rhythm.observe(Beat(6, 17.5, "N", 0.9))  # seqs 2-5 never arrived, 4 s
    assert kinds(events) == [("close", "signal_loss")]
    assert events[0].episode.detail == {"cause": "lost_beats", "lost": 4, "span_s": 4.0}
    assert rhythm.observe(Beat(8, 18.5, "N", 0.9)) == []  # one lost beat over 1 s: nothing


def test_unrecoverable_beats_in_a_row_are_signal_loss_until_a_beat_is_classified(rhythm):
    events = feed(rhythm, "NN--NN---NN")
    assert kinds(events) == [("open", "signal_loss"), ("close", "signal_loss")]
    opened, closed = (e.episode for e in events)
    assert (opened.first_seq, closed.last_seq, closed.beats) == (6, 8, 3)
    assert opened.detail == {"cause": "unrecoverable"}


def test_a_silent_patient_is_signal_loss_until_its_next_beat(rhythm):
    feed(rhythm, "NNNN")
    events = rhythm.went_silent(12.0)
    assert kinds(events) == [("open", "signal_loss")]
    assert events[0].episode.detail["cause"] == "silent"
    assert rhythm.went_silent(13.0) == []  # already open
    events = rhythm.observe(Beat(4, 150.0, "N", 0.9))
    assert kinds(events) == [("close", "signal_loss")]
    assert events[0].episode.end_time == 150.0


def test_updates_of_an_open_episode_at_most_every_interval():
    rhythm = PatientRhythm("p1", EpisodeConfig(update_interval_s=10.0))
    events = feed(rhythm, "N" * 3 + "V" * 100 + "N", rr=0.4)  # 40 s of VT
    vt = kinds(events, "ventricular_tachycardia", updates=True)
    assert [k for k, _ in vt] == ["open", "update", "update", "update", "close"]
    updates = [e.episode for e in events if e.kind == "update" and e.episode.type == vt[0][1]]
    assert all(b.end_time - a.end_time >= 10.0 for a, b in zip(updates, updates[1:]))


def test_a_restored_patient_goes_on_without_losing_or_repeating_an_episode():
    """Stop mid-episode, restore from a JSON round trip of the snapshot, replay the beats
    after it (as a worker replays an uncommitted batch) and go on: the same events as one
    uninterrupted run."""
    labels = "NNN" + "V" * 12 + "NN" + "NV" * 8 + "NNNNNN"
    whole = feed(PatientRhythm("p1", EpisodeConfig()), labels, rr=0.4)

    first = PatientRhythm("p1", EpisodeConfig())
    before = feed(first, labels[:9], rr=0.4)  # VT is open
    assert kinds(before) == [("open", "ventricular_tachycardia")]
    state = json.loads(json.dumps(first.snapshot()))
    restored = PatientRhythm.restore("p1", EpisodeConfig(), state)
    replayed = feed(restored, labels[6:9], rr=0.4, start_seq=6, t0=100 + 6 * 0.4)
    assert replayed == []  # beats the snapshot holds change nothing
    after = feed(restored, labels[9:], rr=0.4, start_seq=9, t0=100 + 9 * 0.4)
    as_ids = [(e.kind, e.episode.episode_id, e.episode.last_seq) for e in before + after]
    assert as_ids == [(e.kind, e.episode.episode_id, e.episode.last_seq) for e in whole]


def test_a_snapshot_holds_exactly_the_state_as_plain_data_and_copies_it():
    """The shallow snapshot (the worker takes one per touched patient per batch) holds what
    `dataclasses.asdict` would, survives JSON, and does not change with the patient after."""
    import dataclasses

    rhythm = PatientRhythm("p1", EpisodeConfig())
    feed(rhythm, "NNN" + "V" * 6 + "NV" * 6 + "N" * 4, rr=0.4)  # VT closed, bigeminy open
    state = rhythm.snapshot()
    parts = {"v_run": rhythm.runs.v, "s_run": rhythm.runs.s, "af": rhythm.af}
    parts |= {"unrecoverable": rhythm.unrecoverable, "rate": rhythm.rate}
    deep = {k: dataclasses.asdict(v) for k, v in parts.items()}
    deep["chains"] = {k: dataclasses.asdict(v) for k, v in rhythm.chains.items()}
    deep["open"] = {k: dataclasses.asdict(v) for k, v in rhythm.book.open.items()}
    assert state["open"] and {k: state[k] for k in deep} == deep
    assert json.loads(json.dumps(state)) == state
    feed(rhythm, "N" * 40, rr=0.4, start_seq=100, t0=200)
    assert {k: state[k] for k in deep} == deep  # the snapshot did not move with the patient


def test_a_snapshot_from_before_runs_counted_beats_restores_the_same_runs():
    """Changelog snapshots written before a run's `count` was named `beats` still restore:
    a rolling upgrade reads its predecessor's state."""
    rhythm = PatientRhythm("p1", EpisodeConfig())
    feed(rhythm, "NNNVV", rr=0.4)  # a V run of two, still open
    state = json.loads(json.dumps(rhythm.snapshot()))
    for run in ("v_run", "s_run", "unrecoverable"):
        state[run]["count"] = state[run].pop("beats")
    restored = PatientRhythm.restore("p1", EpisodeConfig(), state)
    assert restored.runs.v == rhythm.runs.v and restored.runs.v.beats == 2
    assert restored.snapshot() == rhythm.snapshot()


def test_a_gap_after_a_restore_is_not_reported_as_lost_signal():
    rhythm = PatientRhythm("p1", EpisodeConfig())
    feed(rhythm, "N" * 10)
    restored = PatientRhythm.restore("p1", EpisodeConfig(), rhythm.snapshot())
    # Beats 10-19 were processed by the previous owner after its last snapshot.
    assert feed(restored, "N" * 5, start_seq=20, t0=100 + 20 * 0.8) == []


def test_a_replayed_beat_changes_nothing(rhythm):
    feed(rhythm, "NNVV")
    assert rhythm.observe(Beat(3, 102.4, "V", 0.9)) == []
    assert rhythm.observe(Beat(1, 100.8, "N", 0.9)) == []


def test_config_bounds_are_checked():
    with pytest.raises(ValueError, match="af_close"):
        EpisodeConfig(af_open=0.3, af_close=0.5).validate()
    with pytest.raises(ValueError, match="vt_beats"):
        EpisodeConfig(vt_beats=1).validate()


def test_an_unreadable_changelog_record_is_skipped_not_fatal():
    """A corrupt or future-version state record leaves that patient to start afresh."""
    from types import SimpleNamespace

    from stream.config import load_config
    from stream.metrics import WorkerMetrics
    from stream.rhythm_stage import RhythmStage

    stage = RhythmStage(load_config(env={}), WorkerMetrics(), "test", "w0")
    good = PatientRhythm("p1", EpisodeConfig())
    feed(good, "NNVV")
    records = [
        SimpleNamespace(key=b"p0", value=b"not json"),
        SimpleNamespace(key=b"p2", value=b'{"state_version": 99, "state": {}}'),
        SimpleNamespace(key=b"p3", value=b'{"state_version": 1, "state": {"last_seq": 1}}'),
        SimpleNamespace(
            key=b"p1", value=json.dumps({"state_version": 1, "state": good.snapshot()}).encode()
        ),
        SimpleNamespace(key=b"p4", value=None),  # a tombstone
    ]
    assert stage.restore(0, records) == 1
    assert stage.partitions[0]["p1"].last_seq == 3


def test_a_device_reset_closes_what_was_open():
    rhythm = PatientRhythm("p1", EpisodeConfig())
    feed(rhythm, "NNN" + "V" * 5, rr=0.4)
    events = rhythm.close_all("device_reset")
    assert kinds(events) == [("close", "ventricular_tachycardia")]
    assert events[0].episode.detail == {"closed_by": "device_reset"}
    assert rhythm.open == {}
