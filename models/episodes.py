"""Rhythm episodes of one patient from its classified beats, in order: one definition for all.

The stream worker (`stream.rhythm_stage`, after the model pass) and the offline evaluation
(`models.evaluate_events`, replaying MIT-BIH records) feed each patient's beats, in seq
order, to `PatientRhythm.observe` and get back `Event`s: an episode opens, is updated at
most every `update_interval_s` while it lasts, and closes. Only the beat's seq, R-peak time,
class and confidence are used, exactly the fields of a repaired beat, so the same beats give
the same episodes everywhere.

Rules (every threshold lives in `EpisodeConfig`, with where its default comes from):

- runs are consecutive seq numbers with the same class; a beat that is lost or unrecoverable
  ends a run (its class is unknown, so it is never counted as either);
- ventricular: 2 V a couplet, 3-5 a run, >= `vt_beats` or >= 3 at >= `vt_rate_bpm` ventricular
  tachycardia (AAMI EC57 counts couplets, short runs of 3-5 and long runs of >= 6). A run
  shorter than `vt_beats` counts only if the mean V confidence of its beats reaches
  `run_confidence`: a short run of doubtful V calls is a false critical alarm (its beats
  still carry their classes), while a long run is evidence enough. Couplets and short runs
  are known only when they end and are reported open and closed together;
- bigeminy / trigeminy: V beats every 2nd / 3rd beat for `pattern_cycles` cycles; they close
  after two missed cycles, so one missed V does not split an episode;
- SVTA: >= `svta_beats` consecutive S at >= `svta_rate_bpm`, not while atrial fibrillation is
  open or the AF test's irregularity is at its closing level (an irregular rhythm makes
  early, S-shaped beats by definition);
- atrial fibrillation: the share of irregular successive RR intervals (differing by more
  than `af_delta` of the median) over the last `af_window` intervals that touch no S or V
  beat (an ectopic beat makes a short and a long interval in any rhythm), with hysteresis; the
  episode spans its first to its last irregular interval. It does not open where fewer than
  `af_min_usable` of the window's beats are usable (dense ectopy: there a few missed
  ectopic calls would be all the irregularity left);
- bradycardia / tachycardia: the median heart rate of the last `rate_beats` intervals, with
  `rate_hysteresis_bpm` of hysteresis;
- pause: an RR interval of >= `pause_s` between consecutive seq numbers (seen, not guessed);
- signal loss: >= `signal_loss_beats` unrecoverable beats in a row, beats lost (a seq gap)
  over >= `pause_s` (whether the heart paused is unknown: it is reported as lost signal, not
  as a pause), or no beat for `silence_s` (checked by the caller's clock, `went_silent`).
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field

from models.rhythm import irregular_steps

EPISODE_TYPES = (
    "ventricular_couplet",
    "ventricular_run",
    "ventricular_tachycardia",
    "ventricular_bigeminy",
    "ventricular_trigeminy",
    "svta",
    "atrial_fibrillation",
    "bradycardia",
    "tachycardia",
    "pause",
    "signal_loss",
)
SEVERITY = {  # what a monitor would make of it (IEC 60601-2-27 alarm priorities, roughly)
    "ventricular_couplet": "info",
    "ventricular_run": "warning",
    "ventricular_tachycardia": "critical",
    "ventricular_bigeminy": "info",
    "ventricular_trigeminy": "info",
    "svta": "warning",
    "atrial_fibrillation": "warning",
    "bradycardia": "warning",
    "tachycardia": "warning",
    "pause": "critical",
    "signal_loss": "warning",
}
EVENT_KINDS = ("open", "update", "close")
MAX_RR_S = 60.0  # a longer interval is a clock or device problem, not one heartbeat


@dataclass
class EpisodeConfig:
    """Thresholds and windows of the rhythm stage (`episodes:` in defaults.yaml)."""

    vt_beats: int = 6  # EC57 long run
    vt_rate_bpm: float = 100.0  # VT: >= 3 V above 100 bpm (ACC/AHA/ESC 2006 definition)
    run_confidence: float = 0.7  # runs < vt_beats need this mean V confidence (DS1-chosen)
    pattern_cycles: int = 3  # bigeminy/trigeminy from 3 cycles (EC57 counts 3+ cycles)
    svta_beats: int = 3
    svta_rate_bpm: float = 100.0
    af_window: int = 32  # intervals (Lian 2011, Dash 2009: 32-128 beats)
    af_delta: float = 0.1  # an interval is irregular if it differs by > 10% from the last one
    af_open: float = 0.55  # share of irregular intervals to open (tuned on DS1 only)
    af_close: float = 0.35  # and to close
    af_min_usable: float = 0.66  # opens only if this share of the window's beats is usable
    rate_beats: int = 16  # heart-rate window (monitors average 4-16 beats; 8 flapped)
    brady_bpm: float = 50.0  # default adult low limit of bedside monitors
    tachy_bpm: float = 120.0  # default adult high limit of bedside monitors
    rate_hysteresis_bpm: float = 5.0
    pause_s: float = 3.0  # ACC/AHA: pauses >= 3 s are significant
    signal_loss_beats: int = 3
    silence_s: float = 10.0  # wall clock without any beat (the caller's clock)
    update_interval_s: float = 60.0  # patient time between updates of an open episode

    def validate(self) -> None:
        counts = ("vt_beats", "pattern_cycles", "svta_beats", "rate_beats", "signal_loss_beats")
        for name in counts:
            if getattr(self, name) < 2:
                raise ValueError(f"episodes.{name} must be >= 2")
        if self.af_window < 8:
            raise ValueError("episodes.af_window must be >= 8")
        for name in ("af_min_usable", "run_confidence"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"episodes.{name} must be in [0, 1]")
        if not 0 <= self.af_close <= self.af_open <= 1:
            raise ValueError("episodes: need 0 <= af_close <= af_open <= 1")
        if not 0 < self.brady_bpm < self.tachy_bpm:
            raise ValueError("episodes: need 0 < brady_bpm < tachy_bpm")
        for name in ("pause_s", "silence_s", "update_interval_s", "af_delta"):
            if getattr(self, name) <= 0:
                raise ValueError(f"episodes.{name} must be > 0")


@dataclass
class Beat:
    """What the rhythm stage reads of one beat (the repaired-beat fields it uses)."""

    seq: int
    time: float  # R-peak time, seconds (the patient's clock)
    label: str | None  # AAMI class; None when unrecoverable
    confidence: float = 0.0  # the class probability


@dataclass
class Stretch:
    """Consecutive beats: the first and last (seq, time), and the intervals inside them."""

    first_seq: int
    last_seq: int
    start_time: float
    end_time: float
    beats: int = 1
    rr_sum: float = 0.0  # intervals inside the stretch, for its heart rate
    rr_count: int = 0

    def heart_rate_bpm(self) -> float | None:
        return 60.0 * self.rr_count / self.rr_sum if self.rr_count and self.rr_sum > 0 else None

    def add(self, beat: Beat, rr: float | None) -> None:
        """The next beat, `rr` the interval that ends at it (None: unknown)."""
        self.last_seq, self.end_time = beat.seq, beat.time
        self.beats += 1
        if rr is not None:
            self.rr_sum += rr
            self.rr_count += 1

    def span(self) -> dict:
        """The stretch's own fields, to carry over to an episode it starts."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Stretch)}


@dataclass(kw_only=True)
class Episode(Stretch):
    episode_id: str
    type: str
    confidence: float = 1.0
    updated_at: float = 0.0  # patient time of the last open/update event
    detail: dict = field(default_factory=dict)


@dataclass
class Event:
    kind: str  # open, update, close
    episode: Episode  # a copy, as it stood when the event was made
    whole: bool = False  # a close of an episode never opened (known only once it was over)


@dataclass
class Run(Stretch):
    """Consecutive beats of one class, and their confidences. An empty run has no beats."""

    confidence_sum: float = 0.0

    @classmethod
    def empty(cls) -> Run:
        return cls(first_seq=-1, last_seq=-2, start_time=0.0, end_time=0.0, beats=0)

    @classmethod
    def restore(cls, state: dict) -> Run:
        """From a snapshot; one taken before `beats` was named `count` has `count`."""
        state = dict(state)
        if "count" in state:
            state["beats"] = state.pop("count")
        return cls(**state)

    def extend(self, beat: Beat, rr: float | None) -> bool:
        """Add a beat; False (and nothing added) if it does not follow the run's last seq.
        The first beat's interval lies outside the run."""
        if self.beats and beat.seq != self.last_seq + 1:
            return False
        if not self.beats:
            self.first_seq, self.start_time, rr = beat.seq, beat.time, None
        self.add(beat, rr)
        self.confidence_sum += beat.confidence
        return True

    def confidence(self) -> float:
        return self.confidence_sum / self.beats if self.beats else 0.0


@dataclass
class Runs:
    """The current ventricular and supraventricular runs, and the episodes they make:
    couplets, runs and ventricular tachycardia; supraventricular tachycardia (SVTA)."""

    v: Run = field(default_factory=Run.empty)
    s: Run = field(default_factory=Run.empty)

    def observe(
        self, beat: Beat, rr: float | None, book: EpisodeBook, c: EpisodeConfig, af: Window
    ):
        """`af`: the AF test's window; no SVTA starts while its share of irregular intervals
        is at AF's closing level (an irregular rhythm makes early, S-shaped beats)."""
        for label in ("V", "S"):
            run = self.v if label == "V" else self.s
            if beat.label != label or not run.extend(beat, rr):
                self._ended(label, run, book, c)
                run = Run.empty()
                if beat.label == label:
                    run.extend(beat, rr)
                if label == "V":
                    self.v = run
                else:
                    self.s = run
        v, s = self.v, self.s
        if vt := book.open.get("ventricular_tachycardia"):
            if v.beats:
                vt.add(beat, rr)
        elif v.beats >= c.vt_beats or (
            v.beats >= 3
            and (v.heart_rate_bpm() or 0) >= c.vt_rate_bpm
            and v.confidence() >= c.run_confidence
        ):
            book.start_run("ventricular_tachycardia", v, {}, v.confidence())
        if svta := book.open.get("svta"):
            if s.beats:
                svta.add(beat, rr)
        elif (
            s.beats >= c.svta_beats
            and (s.heart_rate_bpm() or 0) >= c.svta_rate_bpm
            and "atrial_fibrillation" not in book.open
            and af.irregular_share(c.af_delta) < c.af_close
        ):
            book.start_run("svta", s, {}, s.confidence())

    @staticmethod
    def _ended(label: str, run: Run, book: EpisodeBook, c: EpisodeConfig) -> None:
        """A run ended before this beat: close its episode, or report a short run whole."""
        if label == "S":
            if "svta" in book.open:
                book.close("svta", run.end_time)
        elif "ventricular_tachycardia" in book.open:
            book.close("ventricular_tachycardia", run.end_time)
        elif run.beats >= 2 and run.confidence() >= c.run_confidence:
            book.whole_run("ventricular_couplet" if run.beats == 2 else "ventricular_run", run)


@dataclass
class Chain:
    """V beats every `period` beats (bigeminy: 2, trigeminy: 3)."""

    period: int
    last_v_seq: int = -100
    count: int = 0
    first_seq: int = -1
    start_time: float = 0.0
    last_match_seq: int = -100  # the last V that kept the pattern
    last_match_time: float = 0.0
    confidence_sum: float = 0.0

    def observe(self, name: str, beat: Beat, rr: float | None, book: EpisodeBook, cycles: int):
        """Bigeminy and trigeminy: a V every 2nd / 3rd beat. While open, a V where the
        pattern expects one keeps it (one missed V does not split it); two missed close it."""
        ep = book.open.get(name)
        if ep is not None:
            ep.add(beat, rr)
        if beat.label == "V":
            on_beat = ep is not None and (beat.seq - self.last_match_seq) % self.period == 0
            if beat.seq - self.last_v_seq == self.period or on_beat:
                self.count += 1
                self.confidence_sum += beat.confidence
                self.last_match_seq, self.last_match_time = beat.seq, beat.time
            else:
                self.count, self.first_seq, self.start_time = 1, beat.seq, beat.time
                self.confidence_sum = beat.confidence
            self.last_v_seq = beat.seq
            if ep is None and self.count >= cycles:
                ep = book.start(
                    name,
                    Beat(self.first_seq, self.start_time, None),
                    self.confidence_sum / self.count,
                    {},
                    beats=beat.seq - self.first_seq + 1,
                    last_seq=beat.seq,
                    end_time=beat.time,
                )
        if ep is not None and beat.seq - self.last_match_seq > 2 * self.period:
            ep.last_seq = self.last_match_seq
            ep.beats = ep.last_seq - ep.first_seq + 1
            book.close(name, self.last_match_time)


@dataclass
class Window:
    """Recent intervals for a rate or irregularity test, with the times of their beats."""

    size: int
    rr: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # of the beat ending each interval
    seqs: list[int] = field(default_factory=list)
    last_irregular: float = 0.0  # time of the last irregular interval (AF)

    def push(self, rr: float, beat: Beat) -> None:
        self.rr.append(rr)
        self.times.append(beat.time)
        self.seqs.append(beat.seq)
        if len(self.rr) > self.size:
            del self.rr[0], self.times[0], self.seqs[0]

    def start_of(self, k: int) -> Beat:
        """The beat that starts interval k."""
        return Beat(self.seqs[k] - 1, self.times[k] - self.rr[k], None)

    def full(self) -> bool:
        return len(self.rr) >= self.size

    def steps(self, delta: float) -> list[bool]:
        """Which successive intervals differ by more than delta of the median (the AF test)."""
        return irregular_steps(self.rr, delta) if len(self.rr) >= 2 else []

    def irregular_share(self, delta: float) -> float:
        steps = self.steps(delta)
        return sum(steps) / len(steps) if steps else 0.0


class EpisodeBook:
    """One patient's open episodes, and the events of the beat being taken: how an episode
    opens, is closed, or is reported whole (the detectors of PatientRhythm decide when)."""

    def __init__(self, patient_id: str):
        self.patient_id = patient_id
        self.open: dict[str, Episode] = {}
        self.events: list[Event] = []

    def start(self, name: str, first: Beat, confidence: float, detail: dict, **fields):
        """Open an episode from `first` (`fields`: its other Episode fields so far)."""
        ep = self.episode(name, first, confidence, detail)
        for key, value in fields.items():
            setattr(ep, key, value)
        self.open[name] = ep
        self.emit("open", ep)
        return ep

    def episode(self, name: str, first: Beat, confidence: float, detail: dict) -> Episode:
        return Episode(
            episode_id=f"{self.patient_id}/{name}/{round(first.time * 1000)}",  # seqs restart
            type=name,
            first_seq=first.seq,
            last_seq=first.seq,
            start_time=first.time,
            end_time=first.time,
            confidence=round(confidence, 3),
            updated_at=first.time,
            detail=detail,
        )

    def start_run(self, name: str, run: Run, detail: dict, confidence: float) -> Episode:
        first = Beat(run.first_seq, run.start_time, None)
        return self.start(name, first, confidence, detail, **run.span())

    def whole_run(self, name: str, run: Run) -> None:
        """A run reported once it is over (a couplet, a short run): one close event."""
        ep = self.episode(name, Beat(run.first_seq, run.start_time, None), run.confidence(), {})
        for key, value in run.span().items():
            setattr(ep, key, value)
        self.emit("close", ep, whole=True)

    def start_window(self, name: str, w: Window, k: int, beat: Beat, confidence, **detail):
        """An episode over a window's intervals k.. up to this beat."""
        first = w.start_of(k)
        return self.start(
            name,
            first,
            confidence,
            detail,
            rr_sum=sum(w.rr[k:]),
            rr_count=len(w.rr) - k,
            beats=beat.seq - first.seq + 1,
            last_seq=beat.seq,
            end_time=beat.time,
        )

    def close(self, name: str, end_time: float) -> None:
        ep = self.open.pop(name)
        ep.end_time = max(ep.start_time, end_time)
        self.emit("close", ep)

    def instant(self, name: str, first: Beat, beat: Beat, rr, detail: dict) -> None:
        """An episode seen whole at one beat (a pause, a lost stretch): one close event,
        beside any open episode of the same type."""
        ep = self.episode(name, first, 1.0, detail)
        ep.beats, ep.last_seq, ep.end_time = 2, beat.seq, beat.time
        if rr is not None:
            ep.rr_sum, ep.rr_count = rr, 1
        self.emit("close", ep, whole=True)

    def emit(self, kind: str, ep: Episode, whole: bool = False) -> None:
        self.events.append(Event(kind, dataclasses.replace(ep, detail=dict(ep.detail)), whole))


def plain(state) -> dict:
    """A flat dataclass of the rhythm state as a dict, its lists and dicts copied.

    The worker snapshots every patient it touches in every batch; `dataclasses.asdict`
    (recursive, deep-copying) was one of the I/O process's largest costs there."""
    return {k: v.copy() if isinstance(v, (list, dict)) else v for k, v in vars(state).items()}


class PatientRhythm:
    """The rhythm stage's state for one patient, fed its beats in seq order."""

    def __init__(self, patient_id: str, cfg: EpisodeConfig):
        self.patient_id, self.cfg = patient_id, cfg
        self.last_seq: int | None = None
        self.last_time: float | None = None
        self.last_label: str | None = None
        self.last_ectopic = True  # the previous beat is kept out of the AF test
        self.resumed = False  # restored from a snapshot: a seq gap next is not a loss
        self.runs, self.unrecoverable = Runs(), Run.empty()
        self.chains = {"ventricular_bigeminy": Chain(2), "ventricular_trigeminy": Chain(3)}
        self.af = Window(cfg.af_window)
        self.rate = Window(cfg.rate_beats)
        self.book = EpisodeBook(patient_id)

    @property
    def open(self) -> dict[str, Episode]:
        """The patient's open episodes, by type."""
        return self.book.open

    # ------------------------------------------------------------------ feeding

    def observe(self, beat: Beat) -> list[Event]:
        """Take the patient's next beat; returns the events it causes. A beat at or before
        the last seq seen (a replay after a restart) changes nothing."""
        self.book.events = []
        if self.last_seq is not None and beat.seq <= self.last_seq:
            return []
        silent = self.book.open.get("signal_loss")
        silent = silent is not None and silent.detail.get("cause") == "silent"
        if silent:  # whether the heart paused or the device was away is unknown
            self.book.close("signal_loss", beat.time)
        rr = None if silent else self._interval(beat)
        self._signal(beat)
        if rr is not None and rr >= self.cfg.pause_s:
            self.book.instant("pause", self._previous(), beat, rr, {"rr_s": round(rr, 3)})
        self._rate(beat, rr)
        self._atrial_fibrillation(beat, rr)
        self.runs.observe(beat, rr, self.book, self.cfg, self.af)
        for name, chain in self.chains.items():
            chain.observe(name, beat, rr, self.book, self.cfg.pattern_cycles)
        for ep in self.book.open.values():
            if beat.time - ep.updated_at >= self.cfg.update_interval_s:
                ep.updated_at = beat.time
                self.book.emit("update", ep)
        self.last_seq, self.last_time, self.last_label = beat.seq, beat.time, beat.label
        self.resumed = False
        return self.book.events

    def went_silent(self, silent_for_s: float) -> list[Event]:
        """The caller saw no beat of this patient for `silent_for_s`: signal loss from the
        last beat on, until the next beat arrives."""
        self.book.events = []
        if self.last_seq is None or "signal_loss" in self.book.open:
            return []
        detail = {"cause": "silent", "silent_for_s": round(silent_for_s, 1)}
        self.book.start("signal_loss", self._previous(), 1.0, detail, beats=0)
        return self.book.events

    def close_all(self, reason: str) -> list[Event]:
        """Close every open episode at its last beat (the device was reset: what follows
        is a new recording); `reason` goes into each close's detail as `closed_by`."""
        self.book.events = []
        for name in list(self.book.open):
            self.book.open[name].detail["closed_by"] = reason
            self.book.close(name, self.book.open[name].end_time)
        return self.book.events

    def _previous(self) -> Beat:
        return Beat(self.last_seq, self.last_time, self.last_label)

    def _interval(self, beat: Beat) -> float | None:
        """The pre-RR interval when the previous seq was seen; reports lost stretches."""
        if self.last_seq is None:
            return None
        lost = beat.seq - self.last_seq - 1
        span = beat.time - self.last_time
        if lost == 0 and 0 < span <= MAX_RR_S:
            return span
        if lost > 0 and not self.resumed and span >= self.cfg.pause_s:
            detail = {"cause": "lost_beats", "lost": lost, "span_s": round(span, 3)}
            self.book.instant("signal_loss", self._previous(), beat, None, detail)
        return None

    def _signal(self, beat: Beat) -> None:
        """Unrecoverable beats in a row: signal loss until a beat can be classified again."""
        ep = self.book.open.get("signal_loss")
        if beat.label is not None:
            self.unrecoverable = Run.empty()
            if ep is not None:
                self.book.close("signal_loss", ep.end_time)
            return
        run = self.unrecoverable
        if not run.extend(beat, None):
            run = self.unrecoverable = Run.empty()
            run.extend(beat, None)
        if ep is not None:
            ep.add(beat, None)
        elif run.beats >= self.cfg.signal_loss_beats:
            self.book.start_run("signal_loss", run, {"cause": "unrecoverable"}, 1.0)

    def _rate(self, beat: Beat, rr: float | None) -> None:
        """Bradycardia and tachycardia from the median rate of the last intervals."""
        if rr is None:
            return
        w, c = self.rate, self.cfg
        w.push(rr, beat)
        for name in ("bradycardia", "tachycardia"):
            if ep := self.book.open.get(name):
                ep.add(beat, rr)
        if not w.full():
            return
        bpm = 60.0 / statistics.median(w.rr)
        limits = {
            "bradycardia": (bpm < c.brady_bpm, bpm >= c.brady_bpm + c.rate_hysteresis_bpm),
            "tachycardia": (bpm > c.tachy_bpm, bpm <= c.tachy_bpm - c.rate_hysteresis_bpm),
        }
        for name, (beyond, back) in limits.items():
            if name in self.book.open and back:
                self.book.close(name, beat.time)
            elif name not in self.book.open and beyond:
                self.book.start_window(name, w, 0, beat, 1.0)

    def _atrial_fibrillation(self, beat: Beat, rr: float | None) -> None:
        """Irregularity of the intervals between classified beats that are not S or V (an
        ectopic beat makes a short and a long interval in any rhythm: filtered first)."""
        c, w = self.cfg, self.af
        ep = self.book.open.get("atrial_fibrillation")
        if ep is not None:
            ep.add(beat, rr)
        ectopic = beat.label in (None, "S", "V")
        if rr is None or ectopic or self.last_ectopic:
            self.last_ectopic = ectopic
            return
        self.last_ectopic = False
        w.push(rr, beat)
        steps = w.steps(c.af_delta)
        if not steps:
            return
        if steps[-1]:
            w.last_irregular = beat.time
        if not w.full():
            return
        share = round(sum(steps) / len(steps), 3)
        usable = len(w.rr) / (w.seqs[-1] - w.seqs[0] + 1)
        if ep is None and share >= c.af_open and usable >= c.af_min_usable:
            first = steps.index(True) + 1
            self.book.start_window(
                "atrial_fibrillation", w, first, beat, share, irregular_share=share
            )
        elif ep is not None:
            ep.confidence = max(ep.confidence, share)
            ep.detail["irregular_share"] = share
            if share < c.af_close:
                self.book.close("atrial_fibrillation", w.last_irregular)

    # ------------------------------------------------------------------ snapshots

    def busy(self) -> bool:
        """True while something is in progress (an open episode, a run, a pattern): then a
        lost snapshot would lose more than a few intervals of history."""
        return bool(
            self.book.open
            or self.runs.v.beats
            or self.runs.s.beats
            or self.unrecoverable.beats
            or any(self.last_seq - c.last_v_seq <= 2 * c.period for c in self.chains.values())
        )

    def snapshot(self) -> dict:
        """Everything needed to go on after a restart, as plain data."""
        return {
            "last_seq": self.last_seq,
            "last_time": self.last_time,
            "last_label": self.last_label,
            "last_ectopic": self.last_ectopic,
            "v_run": plain(self.runs.v),
            "s_run": plain(self.runs.s),
            "unrecoverable": plain(self.unrecoverable),
            "chains": {k: plain(v) for k, v in self.chains.items()},
            "af": plain(self.af),
            "rate": plain(self.rate),
            "open": {k: plain(v) for k, v in self.book.open.items()},
        }

    @classmethod
    def restore(cls, patient_id: str, cfg: EpisodeConfig, state: dict) -> PatientRhythm:
        """The inverse of `snapshot`. The next beat may follow a gap (beats processed after
        the snapshot was taken): that gap is not reported as lost signal."""
        p = cls(patient_id, cfg)
        p.last_seq, p.last_time = state["last_seq"], state["last_time"]
        p.last_label, p.last_ectopic = state["last_label"], state["last_ectopic"]
        p.runs = Runs(Run.restore(state["v_run"]), Run.restore(state["s_run"]))
        p.unrecoverable = Run.restore(state["unrecoverable"])
        p.chains = {k: Chain(**v) for k, v in state["chains"].items()}
        p.af, p.rate = Window(**state["af"]), Window(**state["rate"])
        p.book.open = {k: Episode(**v) for k, v in state["open"].items()}
        p.resumed = True
        return p
