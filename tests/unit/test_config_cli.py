"""One config source (YAML -> dataclasses, env, CLI) and a CLI that fails in one line."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys

import pytest

from stream import cli
from stream.config import Config, ConfigError, load_config
from stream.kafka import client_options
from tests.helpers import ROOT


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "stream.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def test_defaults_yaml_is_generated_from_the_dataclasses():
    """One declaration: the packaged YAML is rendered from the dataclasses and loads back to
    exactly the defaults (regenerate with `ecg-stream config --defaults`)."""
    from stream.config import DEFAULTS
    from stream.config_reference import render_defaults

    assert DEFAULTS.read_text() == render_defaults(), "run: ecg-stream config --defaults"
    assert load_config(DEFAULTS, env={}) == load_config(env={}) == Config()
    assert "  max_batch: 256\n" in DEFAULTS.read_text()
    assert "# On assignment, re-read this many raw records" in DEFAULTS.read_text()


def test_a_range_declared_beside_a_field_is_enforced():
    with pytest.raises(ConfigError, match=r"worker.warmup_records = -1 is out of range \[0, "):
        load_config(overrides=["worker.warmup_records=-1"], env={})
    with pytest.raises(ConfigError, match=r"simulator.dropout.drop_rate = 2.0 is out of range"):
        load_config(overrides=["simulator.dropout.drop_rate=2"], env={})


def test_precedence_yaml_env_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("worker:\n  max_batch: 64\n  max_wait_ms: 7\n")
    env = {"ECG_WORKER__MAX_BATCH": "128", "ECG_DATA_DIR": "/data/mitdb"}
    cfg = load_config(path, ["worker.max_batch=512"], env=env)
    assert cfg.worker.max_batch == 512 and cfg.worker.max_wait_ms == 7
    assert cfg.data.mitdb_dir == "/data/mitdb"
    assert load_config(path, env=env).worker.max_batch == 128
    cfg = load_config(overrides=["simulator.records=100,101", "kafka.compression=lz4"], env={})
    assert cfg.simulator.records == ["100", "101"] and cfg.kafka.compression == "lz4"


@pytest.mark.parametrize(
    "content,overrides,needle",
    [
        ("worker: [unclosed", [], "invalid YAML"),
        ("worker:\n  max_bach: 3\n", [], "unknown config key: worker.max_bach"),
        ("nosuchsection: {}\n", [], "unknown config key: nosuchsection"),
        ("", ["worker.max_batch=0"], "worker.max_batch = 0 is out of range"),
        ("", ["worker.max_batch=many"], "worker.max_batch must be an integer"),
        ("", ["simulator.dropout.gap_prob=1.5"], "simulator.dropout.gap_prob"),
        ("", ["kafka.compression=brotli"], "kafka.compression"),
        ("", ["worker.alert_classes=X"], "worker.alert_classes"),
        ("", ["train.split=both"], "train.split"),
        ("", ["train.persistent_block=0.9", "train.persistent_gap=0.2"], "persistent_gap"),
        ("", ["metrics.port=70000"], "metrics.port"),
        ("", ["simulator.beats=-3"], "simulator.beats"),
        ("", ["simulator.duration_s=-1"], "simulator.duration_s"),
        ("", ["kafka.linger_ms=-1"], "kafka.linger_ms"),
        ("", ["kafka.request_timeout_ms=10"], "kafka.request_timeout_ms"),
        ("", ["evaluator.max_pending=0"], "evaluator.max_pending"),
        ("", ["worker.beat_alerts=lost_beats,loud"], "worker.beat_alerts"),
        ("", ["episodes.af_open=0.2"], "af_close <= af_open"),
        ("", ["episodes.pause_s=0"], "episodes.pause_s"),
    ],
)
def test_bad_config_names_the_key(tmp_path, content, overrides, needle):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_config(path, overrides, env={})


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("worker:\n  max_bach: 3\n")
    cases = [
        (["worker", "--no-such-flag"], "unrecognized arguments"),
        (["simulate", "--patients", "many"], "invalid int value"),
        (["config", "--config", str(bad)], "unknown config key: worker.max_bach"),
        (["config", "--set", "kafka.partitions=0"], "kafka.partitions"),
        (["demo", "--workers", "0"], "--workers: must be at least 1, got 0"),
        (["demo", "--partitions", "-2"], "--partitions: must be at least 1"),
        (["demo", "--duration", "0"], "--duration: must be at least 1"),
        (["evaluate", "--max-beats", "-1"], "--max-beats: must be at least 0"),
        (["tail", "--limit", "ten"], "--limit: invalid int value: 'ten'"),
        (["worker"], "kafka.bootstrap_servers is empty"),
    ]  # runtime failures (missing data or checkpoint) exit 1: tests/e2e/test_cli_behaviour.py
    for args, needle in cases:
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
        assert len(lines) == 1 and needle in lines[0], (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_the_demo_gives_the_embedded_broker_one_partition_per_worker():
    from stream.tooling.demo import demo_partitions

    cfg = Config()
    assert cfg.kafka.partitions == 6
    assert demo_partitions(cfg, 2, None, embedded=True) == 2
    assert demo_partitions(cfg, 3, None, embedded=False) == 6, "a cluster keeps its setting"
    assert demo_partitions(cfg, 2, 4, embedded=True) == 4, "--partitions wins"
    args = cli.build_parser().parse_args(["demo", "--workers", "3", "--partitions", "5"])
    assert (args.workers, args.partitions, args.demo_duration) == (3, 5, 60.0)


def test_every_subcommand_has_help():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == set(cli.COMMANDS)
    for name in commands:
        with pytest.raises(SystemExit) as info:
            parser.parse_args([name, "--help"])
        assert info.value.code == 0


def test_sasl_and_ssl_pass_through_and_secret_stays_secret(tmp_path, monkeypatch, caplog):
    secret = tmp_path / "password"
    secret.write_text("s3cr3t-value\n")
    cfg = load_config(
        overrides=[
            "kafka.bootstrap_servers=k1:9093,k2:9093",
            "kafka.security_protocol=SASL_SSL",
            "kafka.sasl_mechanism=SCRAM-SHA-512",
            "kafka.sasl_username=ecg",
            f"kafka.sasl_password_file={secret}",
            "kafka.ssl_cafile=/etc/ca.pem",
        ],
        env={},
    )
    monkeypatch.delenv("ECG_KAFKA_SASL_PASSWORD", raising=False)
    with caplog.at_level(logging.DEBUG):
        opts = client_options(cfg.kafka)
    assert opts["bootstrap_servers"] == ["k1:9093", "k2:9093"]
    assert opts["sasl_mechanism"] == "SCRAM-SHA-512" and opts["sasl_plain_username"] == "ecg"
    assert opts["sasl_plain_password"] == "s3cr3t-value" and opts["ssl_cafile"] == "/etc/ca.pem"
    monkeypatch.setenv("ECG_KAFKA_SASL_PASSWORD", "from-env")
    assert client_options(cfg.kafka)["sasl_plain_password"] == "from-env"
    assert "s3cr3t" not in caplog.text
    # The password is not a config key, so `ecg-stream config` can never print it.
    assert "password" not in {f.name for f in dataclasses.fields(cfg.kafka)}


def test_config_command_prints_effective_config():
    proc = run_cli("config", "--set", "worker.max_batch=77")
    assert proc.returncode == 0 and '"max_batch": 77' in proc.stdout
