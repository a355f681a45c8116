"""`ecg-stream bench --quick` end to end: every phase runs on real processes and brokers and
reports what BENCHMARKS.md quotes. Speeds are not asserted here (they live in `make bench`)."""

from __future__ import annotations

import json

from stream.config import load_config
from stream.tooling.bench import BATCH_SIZES, SIZED_PARTITIONS, run_benchmarks


def test_quick_bench_reports_every_phase(data_dir, checkpoint, tmp_path):
    cfg = load_config(overrides=[f"data.mitdb_dir={data_dir}", "metrics.port=0"], env={})
    results = run_benchmarks(cfg, tmp_path, quick=True, compare=str(checkpoint))

    assert [row["batch"] for row in results["model"]] == list(BATCH_SIZES)
    assert all(row["shipped"] > 0 and row["reference"] > 0 for row in results["model"])
    assert all(row["compare"] > 0 for row in results["model"])  # measured in the same run
    # which runtime served each size (auto: the faster in the warm-up)
    assert {row["runtime"] for row in results["model"]} <= {"onnx", "torchscript"}
    assert {row["compare_runtime"] for row in results["model"]} <= {"onnx", "torchscript"}
    assert results["compare_version"] == results["model_version"]
    assert results["passthrough"] > 0 and results["worker"] > 0 and results["naive"] > 0
    assert {"io", "model"} <= set(results["worker_peak_rss_by_process_mb"])
    assert results["worker_peak_rss_mb"] == sum(results["worker_peak_rss_by_process_mb"].values())

    runs = {(row["offered"], row["partitions"]) for row in results["latency"]}
    partitions = sorted({SIZED_PARTITIONS, cfg.kafka.partitions})
    assert runs == {(load, p) for load in (250, 1000) for p in partitions}
    for row in results["latency"] + results["broker_latency"]:
        # 5 s at the offered load; a few beats are lost on purpose by the simulator
        assert row["beats"] >= 0.9 * row["offered"] * 5, row
        assert 0 <= row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"], row
    assert [r["partitions"] for r in results["broker_latency"]] == [
        r["partitions"] for r in results["latency"]
    ]

    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(results))
    table = (tmp_path / "bench.md").read_text()
    assert "| offered load (beats/s) | partitions |" in table
    assert (
        f"compared: {results['compare_version']} (beats/s, runtime) | shipped / compared |" in table
    )
    assert table.count("\n| 1,000 | ") == len(partitions)
