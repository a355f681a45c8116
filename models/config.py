"""Training settings (torch-free, so the stream config can embed them without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"
# The committed checkpoints: the served DS1 model (trained DS1, scored on DS2), the
# intra-patient reference and the ECG5000 one-patient autoencoder.
CHECKPOINTS = {
    "inter": WEIGHTS / "ecgnet-ds1.pt",
    "intra": WEIGHTS / "ecgnet-intra.pt",
    "ecg5000": WEIGHTS / "ecg5000-ae.pt",
}
DEFAULT_CHECKPOINT = CHECKPOINTS["inter"]  # what a worker serves unless model.checkpoint says


@dataclass
class TrainConfig:
    split: str = "inter"  # inter: DS1 -> DS2 (de Chazal); intra: random beat split
    records: list[str] = field(default_factory=list)  # empty: all records of the split
    epochs: int = 8  # more fit DS1 closer and generalise worse (10: S +P 52% vs 55%)
    batch_size: int = 128
    lr: float = 3e-3
    seed: int = 0
    hidden: int = 48  # units per direction: 64 classify as well on DS2, at a 1.23x slower pass
    layers: int = 1
    patch: int = 8  # samples per recurrent step: 24 steps per beat
    latent: int = 16
    refine: int = 16  # per-sample refinement channels after the gap head (0: none)
    template_beats: int = 40  # previous beats of a patient the template draws on
    template_matches: int = 8  # 0: their mean; m: the m that best match the beat's samples
    impute_weight: float = 120.0  # the masked-sample MSE in the loss (its scale is small)
    recon_weight: float = 5.0  # the reconstruction loss (nets without context)
    class_weight: float = 1.0
    max_class_weight: float = 20.0
    class_weight_power: float = 0.5  # class weights ~ frequency**-power (0.5: inverse sqrt)
    context: bool = True  # rhythm and the patient's usual beat as input (EcgNet 2)
    rhythm: bool = True  # False: train and serve without the RR features (the ablation)
    detach_heads: bool = False  # True: the encoder learns from the imputation loss alone
    head_dropout: float = 0.2  # dropout in the class head
    persistent_block: float = 0.3  # share of records losing samples 100-137 in every beat
    persistent_gap: float = 0.1  # ... losing one random stretch in every beat
    premature_ratio: float = 0.8  # an N-shaped beat this early against the recent RR is S
    premature_long_ratio: float = 0.85  # ... or this early against the longer-term RR
    premature_af_share: float = 0.55  # ... unless this share of intervals is irregular (AF)
    abnormal_weight: float = 1.0  # the abnormality head's loss (context nets)
    abnormal_pos_weight: float = 3.0  # weight of non-N beats in the abnormality loss
    beats_per_epoch: int = 0  # 0: every training beat once per epoch
    anomaly_quantile: float = 0.999  # threshold: this quantile of N training beats' scores
    threads: int = 1  # 1: bit-reproducible runs, and `make train` runs two side by side
    output: str = ""  # "": the packaged checkpoint of the split (models.config.CHECKPOINTS)

    def validate(self) -> None:
        if self.split not in ("inter", "intra"):
            raise ValueError("train.split must be 'inter' or 'intra'")
        for name in ("epochs", "batch_size", "hidden", "layers", "patch", "latent", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        if self.refine < 0 or self.template_matches < 0:
            raise ValueError("train.refine and train.template_matches must be >= 0")
        if min(self.persistent_block, self.persistent_gap) < 0 or (
            self.persistent_block + self.persistent_gap > 1
        ):
            raise ValueError("train.persistent_block and persistent_gap: shares summing to <= 1")
        if self.template_beats < 1:
            raise ValueError("train.template_beats must be >= 1")
        if not 0 < self.lr < 1:
            raise ValueError("train.lr must be in (0, 1)")
        if not 0.5 <= self.anomaly_quantile < 1:
            raise ValueError("train.anomaly_quantile must be in [0.5, 1)")
