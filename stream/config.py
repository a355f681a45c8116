"""One configuration source: YAML -> dataclasses, then environment, then CLI overrides.

Precedence (last wins): the packaged `defaults.yaml`, a user YAML file (`--config` or
ECG_CONFIG), environment variables `ECG_<SECTION>__<KEY>` (for example
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

import yaml

from models.config import TrainConfig
from models.episodes import EpisodeConfig

DEFAULTS = Path(__file__).with_name("defaults.yaml")


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the key."""


@dataclass
class DataConfig:
    mitdb_dir: str = ""  # empty: user cache, downloading from PhysioNet if needed
    nstdb_dir: str = ""  # empty: a sibling 'nstdb' of mitdb_dir, else the cache
    ecg5000_dir: str = ""  # empty: a sibling 'ecg5000' of mitdb_dir
    download: bool = True


@dataclass
class ModelConfig:
    checkpoint: str = ""  # empty: the packaged models/weights/ecgnet-ds1.pt
    ecg5000_checkpoint: str = ""
    torch_threads: int = 1
    separate_process: bool = True  # the worker runs the model in a child process


@dataclass
class KafkaConfig:
    bootstrap_servers: str = ""  # empty: start the embedded broker (tests, demo)
    client_id: str = "ecg-stream"
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL
    sasl_mechanism: str = ""  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    sasl_username: str = ""
    sasl_password_file: str = ""  # the password comes from this file or ECG_KAFKA_SASL_PASSWORD
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    partitions: int = 6
    replication_factor: int = 1
    session_timeout_ms: int = 10000  # real Kafka refuses < 6000; the embedded profile uses 2000
    heartbeat_interval_ms: int = 3000
    max_poll_interval_ms: int = 60000
    linger_ms: int = 5
    producer_batch_bytes: int = 262144
    compression: str = "none"  # none, gzip, snappy, lz4, zstd
    max_poll_records: int = 1024
    max_partition_fetch_bytes: int = 8388608
    fetch_max_wait_ms: int = 10  # how long the broker may hold a fetch that has no data
    request_timeout_ms: int = 30000
    reconnect_backoff_max_ms: int = 5000


@dataclass
class TopicsConfig:
    raw: str = "ecg.beats.raw"
    truth: str = "ecg.beats.truth"
    repaired: str = "ecg.beats.repaired"
    alerts: str = "ecg.alerts"
    dlq: str = "ecg.beats.dlq"
    events: str = "ecg.events"
    rhythm_state: str = "ecg.rhythm.state"  # compacted changelog of the rhythm stage


@dataclass
class DropoutConfig:
    block_prob: float = 0.1  # the reference block, samples 100-137
    gap_prob: float = 0.3  # one contiguous gap of gap_min..gap_max of the beat
    gap_min: float = 0.05
    gap_max: float = 0.40
    burst_prob: float = 0.2  # Gilbert-Elliott packet loss
    burst_enter: float = 0.05
    burst_leave: float = 0.2
    drop_prob: float = 0.1  # independent sample drops at drop_rate
    drop_rate: float = 0.05
    lost_beat_prob: float = 0.005  # a whole beat never sent (its seq is skipped)
    noise: str = ""  # '', bw, em, ma (nstdb), added at noise_snr_db
    noise_snr_db: float = 12.0


@dataclass
class SimulatorConfig:
    patients: int = 16
    records: list[str] = field(default_factory=list)  # empty: DS2 records
    speed: float = 10.0  # 1 = real time, 0 = as fast as possible
    rate: float = 0.0  # > 0: total beats/s, overriding speed
    seed: int = 0
    duration_s: float = 0.0  # 0: no limit
    beats: int = 0  # 0: no limit
    truth: bool = False  # evaluation mode: ground truth to the truth topic
    max_buffered: int = 100000  # beats held while the broker is unreachable
    metrics_port: int = 0  # 0: no metrics endpoint
    synthetic: bool = False  # replay synthetic beats (no MIT-BIH data), clearly labelled
    dropout: DropoutConfig = field(default_factory=DropoutConfig)


@dataclass
class WorkerConfig:
    group_id: str = "ecg-stream-workers"
    worker_id: str = ""  # empty: hostname-pid
    max_batch: int = 256
    max_wait_ms: int = 1  # see defaults.yaml
    unrecoverable_fraction: float = 0.6  # more missing than this: unrecoverable, not invented
    max_message_bytes: int = 65536
    beat_alerts: list[str] = field(default_factory=lambda: ["lost_beats"])
    alert_classes: list[str] = field(default_factory=lambda: ["S", "V", "F", "Q"])
    min_alert_probability: float = 0.5
    snapshot_interval_s: float = 10.0  # patient time between rhythm snapshots when idle
    max_patients: int = 8000  # per worker; above it the least recently seen is evicted
    patient_idle_s: float = 3600.0  # a patient with no beat for this long is forgotten
    max_clock_lead_s: float = 86400.0  # a timestamp further ahead of the worker's clock: DLQ
    warmup_records: int = 5000  # raw records before a new partition's start re-read (0: off)


@dataclass
class MetricsConfig:
    host: str = "0.0.0.0"
    port: int = 9108  # 0: no endpoint


@dataclass
class EvaluatorConfig:
    group_id: str = "ecg-stream-evaluator"
    metrics_port: int = 9109
    max_pending: int = 200000


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

# (key, lower, upper) bounds checked after every override.
RANGES = [
    ("kafka.partitions", 1, 10000),
    ("kafka.replication_factor", 1, 10),
    ("kafka.session_timeout_ms", 1000, 3600000),
    ("kafka.heartbeat_interval_ms", 100, 600000),
    ("kafka.max_poll_records", 1, 100000),
    ("kafka.fetch_max_wait_ms", 0, 60000),
    ("kafka.max_poll_interval_ms", 1000, 86400000),
    ("kafka.linger_ms", 0, 60000),
    ("kafka.producer_batch_bytes", 1024, 10**9),
    ("kafka.max_partition_fetch_bytes", 1024, 10**9),
    ("kafka.request_timeout_ms", 1000, 3600000),
    ("kafka.reconnect_backoff_max_ms", 0, 3600000),
    ("model.torch_threads", 1, 256),
    ("simulator.patients", 1, 1000000),
    ("simulator.speed", 0, 10000),
    ("simulator.rate", 0, 10000000),
    ("simulator.max_buffered", 1, 100000000),
    ("simulator.duration_s", 0, 10**9),
    ("simulator.beats", 0, 10**12),
    ("worker.max_batch", 1, 65536),
    ("worker.max_wait_ms", 0, 60000),
    ("worker.unrecoverable_fraction", 0, 1),
    ("worker.max_message_bytes", 1024, 100000000),
    ("worker.min_alert_probability", 0, 1),
    ("worker.snapshot_interval_s", 0.1, 86400),
    ("worker.max_patients", 1, 10**8),
    ("worker.patient_idle_s", 1, 10**8),
    ("worker.max_clock_lead_s", 1, 10**10),
    ("worker.warmup_records", 0, 10**7),
    ("metrics.port", 0, 65535),
    ("evaluator.metrics_port", 0, 65535),
    ("simulator.metrics_port", 0, 65535),
    ("evaluator.max_pending", 1, 10**9),
]
PROBABILITIES = (
    "block_prob",
    "gap_prob",
    "gap_min",
    "gap_max",
    "burst_prob",
    "burst_enter",
    "burst_leave",
    "drop_prob",
    "drop_rate",
    "lost_beat_prob",
)


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Config:
    """Build the configuration from defaults, a YAML file, the environment and overrides."""
    env = os.environ if env is None else env
    cfg = Config()
    apply_mapping(cfg, _read_yaml(DEFAULTS), "")
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


def get_value(cfg: Config, dotted: str):
    """Read a dotted key."""
    target = cfg
    for part in dotted.split("."):
        target = getattr(target, part)
    return target


def validate(cfg: Config) -> None:
    """Range checks; raise ConfigError naming the key."""
    for key, lo, hi in RANGES:
        value = get_value(cfg, key)
        if not lo <= value <= hi:
            raise ConfigError(f"{key} = {value} is out of range [{lo}, {hi}]")
    for name in PROBABILITIES:
        value = getattr(cfg.simulator.dropout, name)
        if not 0 <= value <= 1:
            raise ConfigError(f"simulator.dropout.{name} = {value} must be in [0, 1]")
    if cfg.simulator.dropout.gap_min > cfg.simulator.dropout.gap_max:
        raise ConfigError("simulator.dropout.gap_min must not exceed gap_max")
    if cfg.simulator.dropout.noise not in ("", "bw", "em", "ma"):
        raise ConfigError("simulator.dropout.noise must be one of '', bw, em, ma")
    if cfg.kafka.heartbeat_interval_ms >= cfg.kafka.session_timeout_ms:
        raise ConfigError("kafka.heartbeat_interval_ms must be below kafka.session_timeout_ms")
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
