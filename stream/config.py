"""One configuration source: YAML -> dataclasses, then environment, then CLI overrides.

The dataclasses below declare every setting once: its type, its bounds (`Range`), its
default and, in the comment beside it, its meaning; `stream/defaults.yaml` is generated from
them (`ecg-stream config --defaults`). Precedence (last wins): those defaults, a user YAML
file (`--config` or ECG_CONFIG), environment variables `ECG_<SECTION>__<KEY>` (for example
`ECG_WORKER__MAX_BATCH=512`), a few short aliases (ECG_DATA_DIR, ECG_BOOTSTRAP_SERVERS, ...)
and finally `--set section.key=value` flags. Unknown keys, wrong types and out-of-range values
raise ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import yaml

from models.config import TrainConfig
from models.episodes import EpisodeConfig

DEFAULTS = Path(__file__).with_name("defaults.yaml")  # generated: `ecg-stream config --defaults`


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the key."""


@dataclass(frozen=True)
class Range:
    """Inclusive bounds of a numeric setting, declared in its type:
    `max_batch: Annotated[int, Range(1, 65536)] = 256`."""

    lo: float
    hi: float


@dataclass
class DataConfig:
    mitdb_dir: str = ""  # MIT-BIH directory (ECG_DATA_DIR); empty: cache, else PhysioNet download
    nstdb_dir: str = ""  # noise records bw/em/ma; empty: sibling 'nstdb' of mitdb_dir
    ecg5000_dir: str = ""  # UCR ECG5000; empty: sibling 'ecg5000' of mitdb_dir
    download: bool = True  # download from PhysioNet with wfdb when not found


RUNTIMES = ("auto", "torchscript", "onnx")  # model.runtime (stream.engine.Engine)


@dataclass
class ModelConfig:
    checkpoint: str = ""  # empty: packaged models/weights/ecgnet-ds1.pt (ECG_CHECKPOINT)
    ecg5000_checkpoint: str = ""  # empty: packaged models/weights/ecg5000-ae.pt
    # the worker's other core runs Kafka I/O beside the model (`make bench`: faster end to end)
    torch_threads: Annotated[int, Range(1, 256)] = 1
    # worker: the model in its own process, beside the Kafka I/O process
    separate_process: bool = True
    # auto: each batch size on the faster of torchscript and onnx (ONNX Runtime), measured at
    # start-up on this CPU; or torchscript / onnx for every size
    runtime: str = "auto"


@dataclass
class KafkaConfig:
    # host:port[,host:port]; empty: embedded broker (ECG_BOOTSTRAP_SERVERS)
    bootstrap_servers: str = ""
    client_id: str = "ecg-stream"
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL
    sasl_mechanism: str = ""  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    sasl_username: str = ""
    sasl_password_file: str = ""  # or env ECG_KAFKA_SASL_PASSWORD; never put secrets here
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    partitions: Annotated[int, Range(1, 10000)] = 6  # caps the number of busy workers
    replication_factor: Annotated[int, Range(1, 10)] = 1  # use 3 on a real cluster
    # real Kafka refuses < 6000; embedded profile uses 2000
    session_timeout_ms: Annotated[int, Range(1000, 3600000)] = 10000
    heartbeat_interval_ms: Annotated[int, Range(100, 600000)] = 3000
    max_poll_interval_ms: Annotated[int, Range(1000, 86400000)] = 60000
    linger_ms: Annotated[int, Range(0, 60000)] = 5
    producer_batch_bytes: Annotated[int, Range(1024, 10**9)] = 262144
    compression: str = "none"  # none, gzip, snappy, lz4, zstd
    max_poll_records: Annotated[int, Range(1, 100000)] = 1024
    max_partition_fetch_bytes: Annotated[int, Range(1024, 10**9)] = 8388608
    # broker may hold an empty fetch this long (latency floor)
    fetch_max_wait_ms: Annotated[int, Range(0, 60000)] = 10
    request_timeout_ms: Annotated[int, Range(1000, 3600000)] = 30000
    reconnect_backoff_max_ms: Annotated[int, Range(0, 3600000)] = 5000


@dataclass
class TopicsConfig:
    raw: str = "ecg.beats.raw"
    truth: str = "ecg.beats.truth"
    repaired: str = "ecg.beats.repaired"
    alerts: str = "ecg.alerts"
    dlq: str = "ecg.beats.dlq"
    events: str = "ecg.events"  # rhythm episodes: open / update / close
    rhythm_state: str = "ecg.rhythm.state"  # compacted changelog of the rhythm stage (internal)


@dataclass
class DropoutConfig:
    block_prob: Annotated[float, Range(0, 1)] = 0.1  # reference block, samples 100-137
    # one contiguous gap of gap_min..gap_max of the beat
    gap_prob: Annotated[float, Range(0, 1)] = 0.3
    gap_min: Annotated[float, Range(0, 1)] = 0.05
    gap_max: Annotated[float, Range(0, 1)] = 0.40
    burst_prob: Annotated[float, Range(0, 1)] = 0.2  # Gilbert-Elliott packet loss
    burst_enter: Annotated[float, Range(0, 1)] = 0.05
    burst_leave: Annotated[float, Range(0, 1)] = 0.2
    drop_prob: Annotated[float, Range(0, 1)] = 0.1  # independent sample drops at drop_rate
    drop_rate: Annotated[float, Range(0, 1)] = 0.05
    lost_beat_prob: Annotated[float, Range(0, 1)] = 0.005  # whole beat never sent (seq skipped)
    noise: str = ""  # '', bw, em, ma: nstdb noise at noise_snr_db
    noise_snr_db: float = 12.0


@dataclass
class SimulatorConfig:
    # virtual patients cycling through the records with time offsets
    patients: Annotated[int, Range(1, 1000000)] = 16
    records: list[str] = field(default_factory=list)  # empty: the DS2 (test) records
    speed: Annotated[float, Range(0, 10000)] = 10.0  # 1 = real time, 0 = as fast as possible
    # > 0: total beats/s (benchmarks), overrides speed
    rate: Annotated[float, Range(0, 10**7)] = 0.0
    seed: int = 0
    duration_s: Annotated[float, Range(0, 10**9)] = 0.0  # 0: no limit
    beats: Annotated[int, Range(0, 10**12)] = 0  # 0: no limit
    truth: bool = False  # evaluation mode: ground truth to the truth topic
    # beats held while the broker is unreachable
    max_buffered: Annotated[int, Range(1, 10**8)] = 100000
    metrics_port: Annotated[int, Range(0, 65535)] = 0  # 0: no metrics endpoint
    synthetic: bool = False  # replay synthetic beats instead of MIT-BIH (labelled as such)
    dropout: DropoutConfig = field(default_factory=DropoutConfig)


@dataclass
class WorkerConfig:
    group_id: str = "ecg-stream-workers"
    worker_id: str = ""  # empty: hostname-pid
    max_batch: Annotated[int, Range(1, 65536)] = 256
    # batching window while the model is idle; busy: batches grow by themselves
    max_wait_ms: Annotated[int, Range(0, 60000)] = 1
    # beats missing more than this are flagged, not invented
    unrecoverable_fraction: Annotated[float, Range(0, 1)] = 0.6
    max_message_bytes: Annotated[int, Range(1024, 10**8)] = 65536  # checked before parsing JSON
    # Per-beat alerts on ecg.alerts: by default only what no other message says (which seqs never
    # arrived). Rhythm episodes (ecg.events) replace the per-beat arrhythmia alerts and runs of
    # unrecoverable beats; every beat's class, anomaly flag and status stay on ecg.beats.repaired.
    # Add anomaly, arrhythmia or unrecoverable here to get them back.
    beat_alerts: list[str] = field(default_factory=lambda: ["lost_beats"])
    # classes of the opt-in per-beat arrhythmia alert
    alert_classes: list[str] = field(default_factory=lambda: ["S", "V", "F", "Q"])
    min_alert_probability: Annotated[float, Range(0, 1)] = 0.5
    # rhythm snapshot of a quiet patient at most this often (its clock)
    snapshot_interval_s: Annotated[float, Range(0.1, 86400)] = 10.0
    # patients held per worker (~60 KB each); least recent evicted
    max_patients: Annotated[int, Range(1, 10**8)] = 8000
    # forget a patient with no beat for this long (wall clock)
    patient_idle_s: Annotated[float, Range(1, 10**8)] = 3600.0
    # A timestamp further than this ahead of the worker's clock goes to the DLQ (bad_timestamp).
    # Generous because the simulator replays records faster than real time; for devices streaming
    # live, 60-300 s catches clocks gone wrong sooner.
    max_clock_lead_s: Annotated[float, Range(1, 10**10)] = 86400.0
    # On assignment, re-read this many raw records before the partition's start to rebuild its
    # patients' templates and RR history (the raw topic is their changelog); 0: start cold.
    warmup_records: Annotated[int, Range(0, 10**7)] = 5000


@dataclass
class MetricsConfig:
    host: str = "0.0.0.0"
    port: Annotated[int, Range(0, 65535)] = 9108  # 0: no endpoint


@dataclass
class EvaluatorConfig:
    group_id: str = "ecg-stream-evaluator"
    metrics_port: Annotated[int, Range(0, 65535)] = 9109
    max_pending: Annotated[int, Range(1, 10**9)] = 200000


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    episodes: EpisodeConfig = field(default_factory=EpisodeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


ENV_ALIASES = {
    "ECG_DATA_DIR": "data.mitdb_dir",
    "ECG_NSTDB_DIR": "data.nstdb_dir",
    "ECG5000_DIR": "data.ecg5000_dir",
    "ECG_BOOTSTRAP_SERVERS": "kafka.bootstrap_servers",
    "KAFKA_BOOTSTRAP_SERVERS": "kafka.bootstrap_servers",
    "ECG_CHECKPOINT": "model.checkpoint",
}


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Config:
    """Build the configuration from defaults, a YAML file, the environment and overrides."""
    env = os.environ if env is None else env
    cfg = Config()
    user_file = path or env.get("ECG_CONFIG")
    if user_file:
        apply_mapping(cfg, _read_yaml(Path(user_file)), "")
    for name, key in ENV_ALIASES.items():
        if env.get(name):
            set_value(cfg, key, env[name])
    for name, value in env.items():
        if name.startswith("ECG_") and "__" in name:
            set_value(cfg, name[4:].lower().replace("__", "."), value)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        set_value(cfg, key.strip(), value)
    validate(cfg)
    return cfg


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as fh:
            content = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"invalid YAML in {path}{where}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return content


def apply_mapping(obj, mapping: dict, prefix: str) -> None:
    """Set the fields of a dataclass from a (nested) mapping, rejecting unknown keys."""
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key: {full}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} must be a mapping")
            apply_mapping(current, value, f"{full}.")
        else:
            setattr(obj, key, coerce(value, _field_type(obj, key), full))


def set_value(cfg: Config, dotted: str, raw) -> None:
    """Set one dotted key from a string (env or CLI) or a YAML-typed value."""
    *path, leaf = dotted.split(".")
    target = cfg
    for part in path:
        if not hasattr(target, part) or not dataclasses.is_dataclass(getattr(target, part)):
            raise ConfigError(f"unknown config key: {dotted}")
        target = getattr(target, part)
    if leaf not in {f.name for f in dataclasses.fields(target)}:
        raise ConfigError(f"unknown config key: {dotted}")
    if isinstance(raw, str) and _field_type(target, leaf) is not str:
        try:
            raw = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"{dotted}: cannot parse {raw!r}") from None
    setattr(target, leaf, coerce(raw, _field_type(target, leaf), dotted))


def _field_type(obj, name: str):
    return typing.get_type_hints(type(obj))[name]


def coerce(value, kind, key: str):
    """Check/convert a value to the field's type (int, float, bool, str, list[str])."""
    origin = typing.get_origin(kind)
    if origin in (list,):
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        elif isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]  # one record number: `--set simulator.records=201`
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list")
        return [str(v) for v in value]
    if isinstance(kind, types.UnionType):
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, not {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, not {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, not {value!r}")
        return float(value)
    if kind is str:
        if value is None:
            return ""
        if isinstance(value, dict | list):
            raise ConfigError(f"{key} must be a string")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {kind}")


def _ranged_values(obj, prefix: str):
    """(dotted key, value, Range) of every field declared with a Range, nested ones too."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _ranged_values(value, f"{prefix}{f.name}.")
        for bound in getattr(hints[f.name], "__metadata__", ()):
            if isinstance(bound, Range):
                yield f"{prefix}{f.name}", value, bound


def get_value(cfg: Config, dotted: str):
    """Read a dotted key."""
    target = cfg
    for part in dotted.split("."):
        target = getattr(target, part)
    return target


def validate(cfg: Config) -> None:
    """Every field's Range, then the checks across fields; raise ConfigError naming the key."""
    for key, value, bounds in _ranged_values(cfg, ""):
        if not bounds.lo <= value <= bounds.hi:
            raise ConfigError(f"{key} = {value} is out of range [{bounds.lo}, {bounds.hi}]")
    if cfg.simulator.dropout.gap_min > cfg.simulator.dropout.gap_max:
        raise ConfigError("simulator.dropout.gap_min must not exceed gap_max")
    if cfg.simulator.dropout.noise not in ("", "bw", "em", "ma"):
        raise ConfigError("simulator.dropout.noise must be one of '', bw, em, ma")
    if cfg.kafka.heartbeat_interval_ms >= cfg.kafka.session_timeout_ms:
        raise ConfigError("kafka.heartbeat_interval_ms must be below kafka.session_timeout_ms")
    if cfg.model.runtime not in RUNTIMES:
        raise ConfigError(f"model.runtime must be one of {', '.join(RUNTIMES)}")
    if cfg.kafka.compression not in ("none", "gzip", "snappy", "lz4", "zstd"):
        raise ConfigError("kafka.compression must be none, gzip, snappy, lz4 or zstd")
    bad = set(cfg.worker.alert_classes) - {"N", "S", "V", "F", "Q"}
    if bad:
        raise ConfigError(f"worker.alert_classes has unknown classes {sorted(bad)}")
    bad = set(cfg.worker.beat_alerts) - {"anomaly", "arrhythmia", "unrecoverable", "lost_beats"}
    if bad:
        raise ConfigError(f"worker.beat_alerts has unknown types {sorted(bad)}")
    try:
        cfg.train.validate()
        cfg.episodes.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def embedded_profile(cfg: Config, bootstrap: str) -> Config:
    """Settings for the embedded Tansu broker: short sessions (its joins wait half a session)."""
    return dataclasses.replace(
        cfg,
        kafka=dataclasses.replace(
            cfg.kafka,
            bootstrap_servers=bootstrap,
            session_timeout_ms=2000,
            heartbeat_interval_ms=500,
            replication_factor=1,
        ),
    )


def resolve_data_dirs(cfg: Config) -> DataConfig:
    """Fill nstdb/ecg5000 directories from the mitdb directory's siblings when unset."""
    d = dataclasses.replace(cfg.data)
    if d.mitdb_dir:
        parent = Path(d.mitdb_dir).expanduser().parent
        d.nstdb_dir = d.nstdb_dir or str(parent / "nstdb")
        d.ecg5000_dir = d.ecg5000_dir or str(parent / "ecg5000")
    return d


def as_dict(cfg) -> dict:
    """The configuration as plain data (for `ecg-stream config` and reports)."""
    return dataclasses.asdict(cfg)
