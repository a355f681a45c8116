"""`ecg-stream demo` (what `make demo` runs), shortened: embedded broker, two worker
processes, the live evaluator and the report, on real MIT-BIH records."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers import ROOT


def test_a_short_demo_repairs_every_beat_and_writes_its_report(data_dir, checkpoint, tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "stream.cli", "demo", "--duration", "5", "--out", str(out)]
        + ["--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "with 2 workers on 2 partitions" in proc.stdout, "one partition per worker"

    report = (out / "report.md").read_text()
    value = {
        name: cells
        for name, cells in re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", report, re.MULTILINE)
    }
    sent, acked = (int(n) for n in value["beats sent / acknowledged"].split(" / "))
    assert sent > 500 and acked == sent
    assert int(value["beats repaired (consumed)"]) == sent, "every beat sent was repaired"
    assert int(value["dead letters"]) == 0
    assert int(value["samples imputed"]) > 0
    model = float(value["live masked-sample RMSE: model"])
    linear = float(value["live masked-sample RMSE: linear interpolation"])
    assert model < linear, "the model beats linear interpolation on the live stream"
    assert "2 workers on 2 partitions" in report
    assert (out / "repaired_beats.png").stat().st_size > 10_000
    assert {"worker0.log", "worker1.log"} <= {p.name for p in out.iterdir()}
