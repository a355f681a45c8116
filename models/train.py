"""Training of EcgNet on MIT-BIH beats with random dropout, and of the ECG5000 autoencoder.

Every epoch draws fresh masks from `masks.training_mask` and rebuilds each beat's patient
template from that patient's *previous* beats under their own masks, exactly as a worker sees
them in the stream.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models import data as D
from models.baselines import linear_fill
from models.config import CHECKPOINTS, TrainConfig
from models.masks import mask_batch, training_mask
from models.model import (
    CONTEXT_FEATURES,
    EcgNet,
    NetConfig,
    repair,
    save_checkpoint,
    signal_mask,
)
from models.rhythm import sequence_features
from models.templates import TemplateSpec

MODEL_VERSION = "2.4.0"
NO_MLII = ("102", "104")


def training_records(cfg: TrainConfig) -> list[str]:
    """Records used for training/evaluation under the configured split."""
    if cfg.records:
        return list(cfg.records)
    if cfg.split == "inter":
        return list(D.DS1)
    return [r for r in D.ALL_RECORDS if r not in NO_MLII]


def split_beats(cfg: TrainConfig, data_dir: Path) -> tuple[D.Beats, D.Beats]:
    """(train, test) beats: DS1/DS2 for the inter-patient split, a random split for intra."""
    if cfg.split == "inter":
        return D.load_beats(training_records(cfg), data_dir), D.load_beats(D.DS2, data_dir)
    beats = D.load_beats(training_records(cfg), data_dir)
    train_idx, test_idx = D.intra_patient_split(beats, seed=cfg.seed)
    return beats.subset(train_idx), beats.subset(test_idx)


def class_weights(
    labels: np.ndarray, n_classes: int, cap: float, power: float = 0.5
) -> torch.Tensor:
    """Inverse frequency**power weights (0.5: inverse square root), normalised to mean 1 over
    present classes, capped."""
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    w = np.where(counts > 0, np.maximum(counts, 1) ** -power, 0.0)
    w = w / w[counts > 0].mean()
    return torch.tensor(np.minimum(w, cap), dtype=torch.float32)


def model_inputs(beats: D.Beats, missing: np.ndarray, context: BeatContext):
    """Tensors (observed, missing, template, linear, usual, context) for a batch."""
    observed = np.where(missing, 0.0, beats.samples).astype(np.float32)
    linear = linear_fill(observed, missing)
    arrays = (observed, missing, context.template, linear, context.usual, context.features)
    return [torch.from_numpy(np.ascontiguousarray(a, np.float32)) for a in arrays]


@dataclass
class BeatContext:
    """Per beat, what the patient's earlier beats say (as a worker computes it)."""

    template: np.ndarray  # (n, L) the network's template (NaN: unknown)
    usual: np.ndarray  # (n, L) the patient's usual beat (NaN: unknown)
    features: np.ndarray  # (n, CONTEXT_FEATURES) rhythm, then morphology

    def subset(self, index) -> BeatContext:
        return BeatContext(self.template[index], self.usual[index], self.features[index])


def beat_context(
    spec: TemplateSpec, beats: D.Beats, missing: np.ndarray, starts=None, after_gap=None
) -> BeatContext:
    """The context of every beat from the earlier beats of its patient, computed by the same
    code as the worker: templates (`TemplateStore`) and rhythm (`models.rhythm`). `starts`
    marks where a patient's state begins afresh (default: each record's first beat),
    `after_gap` the beats after lost beats (default: none)."""
    first = np.r_[True, beats.record[1:] != beats.record[:-1]]
    starts = first if starts is None else starts | first
    after_gap = np.zeros(len(beats), bool) if after_gap is None else after_gap
    groups = np.cumsum(starts)
    rhythm = sequence_features(beats.time, after_gap, starts)
    ctx = spec.context_batch(beats.samples, missing, beats.length, groups)
    return BeatContext(ctx.template, ctx.usual, np.concatenate([rhythm, ctx.morph], axis=1))


RESET_BEATS = 300  # a patient's state starts afresh every this many beats on average
LOST_BEATS = 0.01  # share of beats whose previous beat never arrived


def epoch_masks(rng, beats: D.Beats, spec: TemplateSpec, cfg: TrainConfig):
    """Fresh training masks and the context they imply.

    Some records lose the same samples in every beat (the reference block, or a fixed stretch,
    as a saturating amplifier would), so the patient template has no data there either and
    the network learns what an unknown template means. Patients' states are reset at random
    (a rebalance, a new patient) and some beats follow lost ones, so the network also learns
    beats whose rhythm and history are unknown.
    """
    missing = mask_batch(training_mask, rng, beats.length, D.BEAT_LEN)
    for record in np.unique(beats.record):
        draw = rng.random()
        if draw >= cfg.persistent_block + cfg.persistent_gap:
            continue
        rows = np.flatnonzero(beats.record == record)
        if draw < cfg.persistent_block:
            start, stop = 100, 138
        else:
            start = int(rng.integers(0, 120))
            stop = start + int(rng.integers(10, 60))
        missing[rows, start:stop] = True
        missing[rows] &= signal_mask(beats.length[rows], D.BEAT_LEN)
    starts = rng.random(len(beats)) < 1.0 / RESET_BEATS
    after_gap = rng.random(len(beats)) < LOST_BEATS
    return missing, beat_context(spec, beats, missing, starts, after_gap)


def losses(net, batch: D.Beats, missing, context: BeatContext, weights, cfg: TrainConfig):
    """(total, impute, class, anomaly) losses of one batch. The anomaly loss is the
    abnormality head's cross-entropy (N vs the rest) for a context net, else the
    reconstruction MSE on observed samples."""
    inputs = model_inputs(batch, missing, context)
    fill, logits, anomaly = net(*inputs)
    target = torch.from_numpy(batch.samples)
    signal = torch.from_numpy(signal_mask(batch.length, D.BEAT_LEN))
    miss = torch.from_numpy(missing) & signal
    obs = signal & ~miss
    impute = ((fill - target) ** 2 * miss).sum() / miss.sum().clamp(min=1)
    labels = torch.from_numpy(batch.label.astype(np.int64))
    cls = nn.functional.cross_entropy(logits, labels, weight=weights)
    if net.config.context:
        abnormal = (labels != 0).float()
        anom = nn.functional.binary_cross_entropy_with_logits(
            anomaly, abnormal, pos_weight=torch.tensor(cfg.abnormal_pos_weight)
        )
    else:
        anom = ((anomaly - target) ** 2 * obs).sum() / obs.sum().clamp(min=1)
    anomaly_weight = cfg.abnormal_weight if net.config.context else cfg.recon_weight
    total = cfg.impute_weight * impute + anomaly_weight * anom + cfg.class_weight * cls
    return total, impute, cls, anom


def train(cfg: TrainConfig, data_dir: Path, progress: bool = True):
    """Train EcgNet; returns (net, meta, history). Reproducible for a given seed."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    train_beats, _ = split_beats(cfg, data_dir)
    net = EcgNet(
        NetConfig(
            hidden=cfg.hidden,
            layers=cfg.layers,
            patch=cfg.patch,
            latent=cfg.latent,
            refine=cfg.refine,
            template_beats=cfg.template_beats,
            template_matches=cfg.template_matches,
            context=cfg.context,
            context_features=CONTEXT_FEATURES if cfg.context else 0,
            rhythm=cfg.rhythm,
            detach_heads=cfg.detach_heads,
            head_dropout=cfg.head_dropout,
            premature_ratio=cfg.premature_ratio,
            premature_long_ratio=cfg.premature_long_ratio,
            premature_af_share=cfg.premature_af_share,
        )
    )
    weights = class_weights(
        train_beats.label, net.config.n_classes, cfg.max_class_weight, cfg.class_weight_power
    )
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    per_epoch = cfg.beats_per_epoch or len(train_beats)
    steps = cfg.epochs * -(-per_epoch // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    history = []
    started = time.time()
    for epoch in range(cfg.epochs):
        net.train()
        missing, context = epoch_masks(rng, train_beats, net.config.template, cfg)
        order = rng.permutation(len(train_beats))[:per_epoch]
        sums = np.zeros(4)
        bar = tqdm(
            range(0, len(order), cfg.batch_size),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not progress,
            leave=False,
        )
        for start in bar:
            idx = np.sort(order[start : start + cfg.batch_size])
            batch = train_beats.subset(idx)
            parts = losses(net, batch, missing[idx], context.subset(idx), weights, cfg)
            opt.zero_grad()
            parts[0].backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            sums += [p.item() * len(idx) for p in parts]
            bar.set_postfix(impute_rmse=f"{np.sqrt(parts[1].item()):.4f}")
        mean = sums / len(order)
        history.append(
            {
                "epoch": epoch + 1,
                "loss": mean[0],
                "impute_mse": mean[1],
                "class_ce": mean[2],
                "anomaly_loss": mean[3],
                "seconds": round(time.time() - started, 1),
            }
        )
        if progress:
            tqdm.write(
                f"epoch {epoch + 1}: impute RMSE {np.sqrt(mean[1]):.4f} "
                f"class CE {mean[2]:.3f} anomaly loss {mean[3]:.4f}"
            )
    net.eval()
    threshold = calibrate_threshold(net, train_beats, rng, cfg)
    meta = {
        "version": f"{MODEL_VERSION}+{cfg.split}",
        "created": datetime.date.today().isoformat(),
        "classes": list(D.AAMI_CLASSES),
        "anomaly_threshold": threshold,
        "anomaly_quantile": cfg.anomaly_quantile,
        "normalisation": "MLII at 125 Hz; each 10 s window min-max scaled to [0, 1]; beat = "
        "R-peak to R-peak + 1.2 x median RR, zero-padded to 187 (Kachuee 2018)",
        "training_data": {
            "database": "MIT-BIH Arrhythmia (mitdb 1.0.0)",
            "split": cfg.split,
            "records": training_records(cfg),
            "beats": len(train_beats),
            "class_counts": train_beats.class_counts(),
        },
        "train_config": asdict(cfg),
        "history": history,
    }
    return net, meta


def calibrate_threshold(net, beats: D.Beats, rng, cfg: TrainConfig, limit: int = 20000) -> float:
    """Anomaly threshold: the `anomaly_quantile` of normal (N) training beats' scores, under the
    training masks and resets (the stream scores beats with gaps and cold starts, so the
    threshold must too)."""
    normal = np.flatnonzero(beats.label == 0)
    idx = np.sort(rng.permutation(normal)[:limit])
    missing, context = epoch_masks(rng, beats, net.config.template, cfg)
    scores = []
    for start in range(0, len(idx), 1024):
        part = idx[start : start + 1024]
        b, c = beats.subset(part), context.subset(part)
        out = repair(net, b.samples, missing[part], c.template, b.length, c.usual, c.features)
        scores.append(out.anomaly_score)
    return float(np.quantile(np.concatenate(scores), cfg.anomaly_quantile)) if scores else 1.0


def train_and_save(cfg: TrainConfig, data_dir: Path, progress: bool = True) -> Path:
    """Train and write the checkpoint to cfg.output (default: the split's packaged one)."""
    net, meta = train(cfg, data_dir, progress)
    out = Path(cfg.output) if cfg.output else CHECKPOINTS[cfg.split]
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, net, meta)
    return out


# --------------------------------------------------------------------------- ECG5000


def train_ecg5000(
    directory: Path,
    epochs: int = 150,
    seed: int = 0,
    threads: int = 2,
    quantile: float = 0.98,
    progress: bool = True,
):
    """The anomaly branch of EcgNet trained on ECG5000 class-1 (normal) TRAIN beats only.

    The threshold is the given quantile of the scores of normal TRAIN beats held out of
    training (20%), so no anomaly label is ever used for fitting or calibration.
    """
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    x, y = D.load_ecg5000(directory, "TRAIN")
    normal = rng.permutation(np.flatnonzero(y == 1))
    n_cal = len(normal) // 5
    fit, cal = x[normal[n_cal:]], x[normal[:n_cal]]
    net = EcgNet(NetConfig(beat_len=x.shape[1], latent=8))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in tqdm(range(epochs), desc="ECG5000 autoencoder", disable=not progress):
        shuffled = fit[rng.permutation(len(fit))]
        for start in range(0, len(fit), 32):
            batch = torch.from_numpy(shuffled[start : start + 32])
            recon = ecg5000_reconstruct(net, batch)
            loss = ((recon - batch) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    threshold = float(np.quantile(ecg5000_scores(net, cal), quantile))
    meta = {
        "version": f"{MODEL_VERSION}+ecg5000",
        "anomaly_threshold": threshold,
        "anomaly_quantile": quantile,
        "training_data": {
            "database": "UCR ECG5000",
            "split": "TRAIN class 1",
            "beats": int(len(fit)),
            "calibration_beats": int(n_cal),
        },
    }
    return net, meta


def ecg5000_reconstruct(net: EcgNet, beats: torch.Tensor) -> torch.Tensor:
    """Bottleneck reconstruction of complete beats (no gaps, no template)."""
    zeros = torch.zeros_like(beats)
    return net(beats, zeros, torch.full_like(beats, float("nan")), beats)[2]


@torch.inference_mode()
def ecg5000_scores(net: EcgNet, beats: np.ndarray) -> np.ndarray:
    """Per-beat reconstruction MSE."""
    t = torch.from_numpy(np.ascontiguousarray(beats, np.float32))
    return ((ecg5000_reconstruct(net, t) - t) ** 2).mean(1).numpy()
