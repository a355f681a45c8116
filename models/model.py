"""The networks: the production EcgNet and the reference notebook's models (baseline).

EcgNet is a mask-aware LSTM autoencoder with one shared encoder and three heads:

    input per sample: observed value (0 if missing), observed flag, patient template (0 where
                      unknown), template-known flag, linear interpolation of the gaps
    -> frames of `patch` samples -> bidirectional LSTM encoder   (shared)
       -> gap head:     per-frame Linear, a correction to the linear interpolation,
                        then (if `refine` > 0) a small per-sample convolution that smooths
                        frame boundaries and restores detail finer than a frame
       -> class head:   mean+max pooled states -> MLP -> 5 AAMI logits
       -> anomaly head: pooled states -> latent bottleneck -> LSTM decoder -> reconstruction

Reading the beat in frames of `patch` samples (8 in production) cuts the recurrent steps from
187 to 24, which is where the CPU time of an LSTM goes. Observed samples are never changed:
`repair` writes the network's output only into missing positions.
"""

from __future__ import annotations

import json
import pickle
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from models.baselines import linear_fill_tensor
from models.batches import Repair
from models.rhythm import FEATURES, N_FEATURES
from models.rhythm import UNKNOWN as RHYTHM_UNKNOWN
from models.templates import N_MORPH, UNKNOWN_MORPH, TemplateSpec


@dataclass
class NetConfig:
    beat_len: int = 187
    patch: int = 4
    hidden: int = 64
    layers: int = 1
    latent: int = 16
    n_classes: int = 5
    refine: int = 0  # channels of the per-sample refinement convolution; 0 = none
    template_beats: int = 20  # the patient template the network was trained with
    template_matches: int = 0  # 0: mean of the previous beats; m: the m best-matching ones
    # Patient context (EcgNet >= 2): the patient's usual beat as two more input channels, and
    # the beat's rhythm and morphology features (`CONTEXT_FEATURES`) into the class head and
    # an abnormality head, whose probability is the anomaly score. Without it the anomaly
    # score is the reconstruction error of the latent decoder (EcgNet 1, the ECG5000 model).
    context: bool = False
    context_features: int = 0  # the rhythm + morphology features it was trained with
    rhythm: bool = True  # False: the rhythm features are always unknown (the ablation)
    detach_heads: bool = False  # the class and abnormality losses do not train the encoder
    head_dropout: float = 0.2  # dropout before the class head's output layer
    # A beat of supraventricular (N or S) morphology whose pre-RR is below this share of the
    # patient's recent average, or below `premature_long_ratio` of its longer-term average, is
    # premature: S (`premature_supraventricular`); not while the share of irregular intervals
    # is at or above `premature_af_share` (0: no such gate). 0: off.
    premature_ratio: float = 0.0
    premature_long_ratio: float = 0.0
    premature_af_share: float = 0.0

    @property
    def frames(self) -> int:
        return -(-self.beat_len // self.patch)

    @property
    def template(self) -> TemplateSpec:
        return TemplateSpec(self.template_beats, self.template_matches)


INPUT_CHANNELS = 5
CONTEXT_CHANNELS = 3  # the usual beat, its known flag, the beat's difference to it (0: unknown)
CONTEXT_FEATURES = N_FEATURES + N_MORPH  # rhythm, then morphology
CONTEXT_WIDTH = 32


class EcgNet(nn.Module):
    """Shared-encoder LSTM: gap filling, AAMI classification and an anomaly score."""

    def __init__(self, config: NetConfig):
        super().__init__()
        self.config = config
        c, h = config, config.hidden
        channels = INPUT_CHANNELS + (CONTEXT_CHANNELS if c.context else 0)
        self.encoder = nn.LSTM(
            channels * c.patch, h, num_layers=c.layers, batch_first=True, bidirectional=True
        )
        self.gap_head = nn.Linear(2 * h, c.patch)
        self.refiner = (
            nn.Sequential(
                nn.Conv1d(INPUT_CHANNELS + 1, c.refine, 9, padding=4),
                nn.ReLU(),
                nn.Conv1d(c.refine, 1, 9, padding=4),
            )
            if c.refine
            else None
        )
        pooled = 4 * h
        if c.context:
            self.context_net = nn.Sequential(nn.Linear(CONTEXT_FEATURES, CONTEXT_WIDTH), nn.ReLU())
            self.class_head = nn.Sequential(
                nn.Linear(pooled + CONTEXT_WIDTH, h),
                nn.ReLU(),
                nn.Dropout(c.head_dropout),
                nn.Linear(h, c.n_classes),
            )
            self.abnormal_head = nn.Sequential(
                nn.Linear(pooled + CONTEXT_WIDTH, h), nn.ReLU(), nn.Linear(h, 1)
            )
        else:
            self.class_head = nn.Sequential(
                nn.Linear(pooled, h), nn.ReLU(), nn.Linear(h, c.n_classes)
            )
            self.to_latent = nn.Linear(pooled, c.latent)
            self.decoder = nn.LSTM(c.latent, h, batch_first=True)
            self.recon_head = nn.Linear(h, c.patch)

    def forward(self, observed, missing, template, linear, usual=None, context=None):
        """Inputs (B, L) float tensors (missing as 0/1; template and usual NaN where the
        patient's recent beats never observed the sample), context (B, CONTEXT_FEATURES).
        Returns fill, logits, and the anomaly output: the abnormality logit (context nets) or
        the reconstruction (B, L)."""
        c = self.config
        width = observed.shape[1]
        pad = c.frames * c.patch - width
        known = ~torch.isnan(template)
        channels = [observed, 1.0 - missing, torch.where(known, template, 0.0), known.float()]
        channels.append(linear)
        if c.context:
            usual_known = ~torch.isnan(usual)
            both = usual_known & (missing == 0)
            channels += [
                torch.where(usual_known, usual, 0.0),
                usual_known.float(),
                torch.where(both, observed - torch.where(usual_known, usual, 0.0), 0.0),
            ]
        x = nn.functional.pad(torch.stack(channels, dim=-1), (0, 0, 0, pad))
        frames = x.reshape(-1, c.frames, x.shape[-1] * c.patch)
        states, _ = self.encoder(frames)
        fill = linear + self.gap_head(states).flatten(1)[:, :width]
        if self.refiner is not None:
            per_sample = torch.cat([x[:, :width, :INPUT_CHANNELS], fill.unsqueeze(-1)], dim=-1)
            fill = fill + self.refine(per_sample.transpose(1, 2))
        pooled = torch.cat([states.mean(1), states.amax(1)], dim=-1)
        if c.context:
            if not c.rhythm:  # the ablation: every beat's rhythm unknown, as in its training
                unknown = torch.from_numpy(RHYTHM_UNKNOWN).expand(context.shape[0], -1)
                context = torch.cat([unknown, context[:, N_FEATURES:]], dim=1)
            shared = pooled.detach() if c.detach_heads else pooled
            summary = torch.cat([shared, self.context_net(context)], dim=-1)
            return fill, self.class_head(summary), self.abnormal_head(summary).squeeze(1)
        logits = self.class_head(pooled)
        z = self.to_latent(pooled)
        decoded, _ = self.decoder(z.unsqueeze(1).expand(-1, c.frames, -1).contiguous())
        recon = self.recon_head(decoded).flatten(1)[:, :width]
        return fill, logits, recon

    def refine(self, per_sample: torch.Tensor) -> torch.Tensor:
        """The refinement convolutions' correction (B, L) of the fill. In inference the second
        one (one output channel) runs as `single_channel_conv`: oneDNN's convolution with one
        output channel is 2-3x slower than that (the pass runs 1.12x faster at batch 256 without
        it). Training keeps `conv1d` (and its backward), so trained weights do not depend on
        it."""
        hidden, last = self.refiner[1](self.refiner[0](per_sample)), self.refiner[2]
        if self.training:
            return last(hidden).squeeze(1)
        return single_channel_conv(hidden, last.weight, last.bias)


def single_channel_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """`conv1d(x, weight, bias, padding=k // 2).squeeze(1)` for one output channel (weight
    (1, C, k), k odd): the channels mixed for every tap by one matmul, then the k shifted
    rows summed. Equal to the convolution up to float rounding."""
    k = weight.shape[2]
    taps = torch.matmul(weight[0].t(), x)  # (B, k, L): tap j's channel mix at every sample
    padded = nn.functional.pad(taps, (k // 2, k // 2))
    width = x.shape[2]
    out = padded[:, 0, :width] + bias
    for j in range(1, k):
        out = out + padded[:, j, j : j + width]
    return out


class RepairPass(nn.Module):
    """The whole repair computation of a batch in torch ops: linear interpolation, the network,
    observed samples copied through, class probabilities and the anomaly score (the
    abnormality probability of a context net, else the reconstruction MSE)."""

    def __init__(self, net: EcgNet):
        super().__init__()
        self.net = net

    def forward(self, beats, missing, template, lengths, usual, context):
        beats = torch.where(missing, torch.zeros_like(beats), beats)
        linear = linear_fill_tensor(beats, missing)
        fill, logits, anomaly = self.net(beats, missing.float(), template, linear, usual, context)
        filled = torch.where(missing, fill, beats)
        if self.net.config.context:
            probabilities = torch.softmax(logits, -1)
            if self.net.config.premature_ratio and self.net.config.rhythm:
                probabilities = premature_supraventricular(probabilities, context, self.net.config)
            return filled, probabilities, torch.sigmoid(anomaly)
        signal = (torch.arange(beats.shape[1]) < lengths.unsqueeze(1)) & ~missing
        err = ((anomaly - beats) ** 2 * signal).sum(1) / signal.sum(1).clamp(min=1)
        return filled, torch.softmax(logits, -1), err


PREMATURE_SOFTNESS = 0.025  # width of the soft step around the prematurity threshold
# the context columns the prematurity rule reads
RR_KNOWN, VS_LOCAL, VS_LONG, AF_SHARE = (
    FEATURES.index(name)
    for name in ("rr_known", "pre_rr_vs_local", "pre_rr_vs_long", "irregular_share")
)


def premature_supraventricular(probabilities, context, config: NetConfig):
    """Class probabilities with the rhythm's verdict on supraventricular beats.

    The class head learns morphology well across patients but S beats poorly: their shape is
    normal, and DS1's 944 S beats come from a few patients. The rhythm generalises: a beat of
    normal (supraventricular) morphology that comes early against the patient's own rhythm
    is a premature supraventricular beat, the prematurity rule of Holter analysis. Early
    against the recent mean finds isolated premature beats; against the longer-term mean it
    also finds the beats of an ectopic atrial run, whose recent mean is itself short. In
    atrial fibrillation every interval is early or late and MIT-BIH calls its beats N, so
    the verdict is withheld while the AF test's share of irregular intervals is high.
    The probability of a supraventricular morphology (N + S) is kept and split between N and
    S: S gets at least the share the soft steps give."""
    known = context[:, RR_KNOWN] > 0
    premature = torch.sigmoid((config.premature_ratio - context[:, VS_LOCAL]) / PREMATURE_SOFTNESS)
    if config.premature_long_ratio:
        early = (config.premature_long_ratio - context[:, VS_LONG]) / PREMATURE_SOFTNESS
        premature = torch.maximum(premature, torch.sigmoid(early))
    if config.premature_af_share:
        regular = (config.premature_af_share - context[:, AF_SHARE]) / PREMATURE_SOFTNESS
        premature = premature * torch.sigmoid(regular)
    premature = premature * known
    supra = probabilities[:, 0] + probabilities[:, 1]
    share = torch.maximum(probabilities[:, 1] / supra.clamp(min=1e-12), premature)
    return torch.cat(
        [
            (supra * (1 - share)).unsqueeze(1),
            (supra * share).unsqueeze(1),
            probabilities[:, 2:],
        ],
        dim=1,
    )


def trace_repair(net: EcgNet) -> torch.jit.ScriptModule:
    """`RepairPass` traced into TorchScript for serving (any batch size, the net's beat width).

    A traced call releases the GIL once for the whole pass; eager mode releases and re-takes it
    at every op, and each re-take waits for the Python thread beside it (Kafka I/O in the
    worker) for up to a switch interval, so eager inference beside a busy thread is many times
    slower."""
    net.eval()
    example = (
        torch.zeros(2, net.config.beat_len),
        torch.zeros(2, net.config.beat_len, dtype=torch.bool),
        torch.zeros(2, net.config.beat_len),
        torch.full((2,), net.config.beat_len),
        torch.zeros(2, net.config.beat_len),
        torch.zeros(2, CONTEXT_FEATURES),
    )
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(RepairPass(net), example, check_trace=False)


@torch.inference_mode()
def repair(
    net: EcgNet | torch.jit.ScriptModule,
    beats: np.ndarray,
    missing: np.ndarray,
    template: np.ndarray,
    lengths,
    usual: np.ndarray | None = None,
    context: np.ndarray | None = None,
) -> Repair:
    """Fill gaps, classify and score a batch in one pass. Observed samples are copied through.
    `net` is an EcgNet or its `trace_repair`; `usual` (the patient's usual beat) and `context`
    (rhythm and morphology features, `CONTEXT_FEATURES` per beat) default to unknown."""
    run = net if isinstance(net, torch.jit.ScriptModule) else RepairPass(net)
    if usual is None:
        usual = np.full(np.shape(beats), np.nan, np.float32)
    if context is None:
        context = unknown_context(len(beats))
    filled, probabilities, score = run(
        torch.from_numpy(np.ascontiguousarray(beats, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(missing, dtype=bool)),
        torch.from_numpy(np.ascontiguousarray(template, dtype=np.float32)),
        torch.from_numpy(np.asarray(lengths, dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(usual, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(context, dtype=np.float32)),
    )
    return Repair(filled.numpy(), probabilities.numpy(), score.numpy())


def unknown_context(n: int) -> np.ndarray:
    """(n, CONTEXT_FEATURES) context of beats with no known rhythm or patient history."""
    return np.tile(np.concatenate([RHYTHM_UNKNOWN, UNKNOWN_MORPH]), (n, 1))


def signal_mask(lengths, width: int) -> np.ndarray:
    """(n, width) bool, True on the signal-bearing part of each beat."""
    return np.arange(width)[None, :] < np.asarray(lengths)[:, None]


# --------------------------------------------------------------------------- reference models


class ReferenceAutoencoder(nn.Module):
    """The reference notebook's autoencoder: LSTM 64 -> LSTM 32 -> LSTM 64 -> Dense(1)."""

    def __init__(self):
        super().__init__()
        self.lstm1 = nn.LSTM(1, 64, batch_first=True)
        self.lstm2 = nn.LSTM(64, 32, batch_first=True)
        self.lstm3 = nn.LSTM(32, 64, batch_first=True)
        self.out = nn.Linear(64, 1)

    def forward(self, beats):
        x, _ = self.lstm1(beats.unsqueeze(-1))
        x, _ = self.lstm2(x)
        x, _ = self.lstm3(x)
        return self.out(x).squeeze(-1)


class ReferenceClassifier(nn.Module):
    """A separate 2-layer LSTM-64 beat classifier, as the notebooks pair with the autoencoder."""

    def __init__(self, n_classes: int = 5):
        super().__init__()
        self.lstm = nn.LSTM(1, 64, num_layers=2, batch_first=True)
        self.out = nn.Linear(64, n_classes)

    def forward(self, beats):
        x, _ = self.lstm(beats.unsqueeze(-1))
        return self.out(x[:, -1])


# --------------------------------------------------------------------------- checkpoints


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely or does not fit the network."""


def save_checkpoint(path, net: EcgNet, meta: dict) -> None:
    """Save weights with their config and metadata (plain JSON types only, so the file loads
    with weights_only=True)."""
    plain = json.loads(json.dumps(meta, default=float))
    torch.save({"state_dict": net.state_dict(), "config": asdict(net.config), "meta": plain}, path)


def load_checkpoint(path) -> tuple[EcgNet, dict]:
    """Load a checkpoint without executing code: weights_only=True refuses pickled objects."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        why = next((ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln), "")
        raise CheckpointError(f"{path}: refused to load an unsafe checkpoint {why[:160]}") from None
    net = EcgNet(NetConfig(**blob["config"]))
    if net.config.context and net.config.context_features != CONTEXT_FEATURES:
        raise CheckpointError(
            f"{path}: trained with {net.config.context_features} context features, this code "
            f"computes {CONTEXT_FEATURES} (models/rhythm.py, models/templates.py)"
        )
    net.load_state_dict(blob["state_dict"])
    net.eval()
    return net, blob["meta"]
