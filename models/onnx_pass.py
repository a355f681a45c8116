"""The served repair pass in ONNX Runtime, beside its TorchScript trace.

At the small batches of a worker at moderate load (1-32 beats) the traced pass spends most of
its time dispatching about 200 small ops; ONNX Runtime runs the same graph with far less
overhead per op (about 2x faster at batch 8 on the machines of BENCHMARKS.md), while at large
batches oneDNN's LSTM in torch is faster. `stream.engine.Engine` measures both at every batch
size it serves and uses the faster one.

The graph is `models.model.RepairPass` exported by `torch.onnx.export` (the torch.export-based
exporter) with a dynamic batch dimension. Exporting takes seconds, so the result is cached
under the user cache directory, keyed by the network's weights and config and by the torch
and exporter versions: a worker exports once per machine and checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from models.batches import Repair
from models.data import cache_dir
from models.model import CONTEXT_FEATURES, EcgNet, RepairPass

log = logging.getLogger(__name__)
INPUTS = ("beats", "missing", "template", "lengths", "usual", "context")
OUTPUTS = ("filled", "probabilities", "score")
FORMAT = "1"  # bump when the export changes, so that cached graphs are rebuilt


def _example(net: EcgNet, rows: int = 4) -> tuple[torch.Tensor, ...]:
    width = net.config.beat_len
    return (
        torch.zeros(rows, width),
        torch.zeros(rows, width, dtype=torch.bool),
        torch.zeros(rows, width),
        torch.full((rows,), width),
        torch.zeros(rows, width),
        torch.zeros(rows, CONTEXT_FEATURES),
    )


def export_repair(net: EcgNet) -> bytes:
    """`RepairPass(net)` as a serialised ONNX model, any number of rows."""
    from torch.export import Dim

    net.eval()
    rows = Dim("rows", min=1, max=65536)
    exporter_log = logging.getLogger("torch.onnx")  # notes on unrelated (torchvision) ops
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                RepairPass(net),
                _example(net),
                input_names=list(INPUTS),
                output_names=list(OUTPUTS),
                dynamic_shapes={name: {0: rows} for name in INPUTS},
                dynamo=True,
                verbose=False,
            )
    finally:
        exporter_log.setLevel(level)
    return program.model_proto.SerializeToString()


def _digest(net: EcgNet) -> str:
    """What the exported graph depends on: weights, config, torch and the export format."""
    h = hashlib.sha256(f"{FORMAT}|{torch.__version__}|{net.config}".encode())
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    h.update(buffer.getvalue())
    return h.hexdigest()[:32]


def cached_export(net: EcgNet, directory: Path | None = None) -> bytes:
    """`export_repair(net)`, read from the cache when this network was exported before (the
    file is written atomically, so concurrent workers never read half of one)."""
    directory = directory or cache_dir() / "onnx"
    path = directory / f"repair-{_digest(net)}.onnx"
    if path.is_file():
        return path.read_bytes()
    model = export_repair(net)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, delete=False) as tmp:
            tmp.write(model)
        os.replace(tmp.name, path)
    except OSError as exc:  # a read-only cache costs the export at every start, nothing else
        log.warning("cannot cache the exported model in %s: %s", directory, exc)
    return model


class OnnxRepair:
    """The repair pass in an ONNX Runtime session: numpy in, `Repair` out, as
    `models.model.repair` with the traced pass."""

    def __init__(self, net: EcgNet, threads: int = 1, model: bytes | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(
            model or cached_export(net), options, providers=["CPUExecutionProvider"]
        )
        # the exporter drops inputs the graph does not read (lengths, in a context net)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, beats, missing, template, lengths, usual, context) -> Repair:
        arrays = (
            np.ascontiguousarray(beats, dtype=np.float32),
            np.ascontiguousarray(missing, dtype=bool),
            np.ascontiguousarray(template, dtype=np.float32),
            np.asarray(lengths, dtype=np.int64),
            np.ascontiguousarray(usual, dtype=np.float32),
            np.ascontiguousarray(context, dtype=np.float32),
        )
        feed = {name: a for name, a in zip(INPUTS, arrays, strict=True) if name in self.inputs}
        filled, probabilities, score = self.session.run(None, feed)
        return Repair(filled, probabilities, score)
