"""The encoder recipe's config: every field of one run (a docstring each), loaded from YAML + overrides and
saved beside its outputs; `resume_key` says which fields a resumed run must share."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from rag_ecg.config import load_config as _load_config


@dataclass
class EncoderTrainConfig:
    """One encoder training run; saved beside its outputs as config.yaml."""

    model: str = "ecg-clip-trace"  # model config name in rag_ecg/encoder/model_configs/ (ecg-clip-tiny|cpu|trace|b16)
    model_overrides: dict = field(default_factory=dict)  # deep-merged into the model config (e.g. image_size)
    db: str | None = None  # case store URL (None: $RAG_ECG_DB or ./data/rag_ecg.db)
    sources: list[str] = field(default_factory=lambda: ["ptbxl"])  # case sources to train/validate on
    train_folds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 7, 8])  # PTB-XL training folds
    val_folds: list[int] = field(default_factory=lambda: [9])  # validation fold(s): queries at evaluation
    limit_train: int | None = None  # use only the first N training cases (smoke runs)
    limit_val: int | None = None  # use only the first N validation cases
    run_dir: str = "runs/encoder"  # outputs (relative paths are under the project root)
    epochs: int = 10  # passes over the training cases, each with fresh renders
    max_steps: int = 0  # > 0: stop after this many optimizer steps in total (smoke runs, tests)
    max_minutes: float = 0.0  # > 0: training time budget; the first epoch's pace fits the schedule into it
    batch_size: int = 64  # pages per optimizer step (per process under DDP)
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 0.05  # AdamW weight decay (not on biases, norms, embeddings, logit scale)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW betas (CLIP uses 0.98)
    warmup_steps: int = 30  # linear warm-up steps before the cosine decay
    min_lr_ratio: float = 0.02  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max gradient norm (0: off)
    aux_weight: float = 1.0  # weight of the superclass BCE head on the image embedding (0: pure CLIP)
    render_preset: str = "random"  # render preset for training pages (random layout, colours, artifacts)
    clean_fraction: float = 0.0  # share of training renders drawn with the clean preset instead
    signal_fraction: float = 0.0  # trace towers: share of items read straight off the WFDB signal (no render)
    dpi: int = 100  # render resolution (the model sees ~350 px wide pages: more dpi only costs time)
    workers: int = 1  # DataLoader render processes (0: render in the training process)
    prefetch_factor: int = 4  # batches each worker renders ahead
    threads: int = 0  # torch CPU threads in the training process (0: the cores the render workers leave)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 0  # weights init, data order and render seeds
    resume: bool = True  # continue from run_dir/last when its config matches
    val_every: int = 1  # quick validation (loss, aux AUC, recall, kNN within the fold) every N epochs (0: off)
    eval_presets: list[str] = field(default_factory=lambda: ["random", "clean"])  # query presets of the final eval
    eval_k: int = 10  # neighbours that vote in kNN classification
    eval_temperature: float = 0.05  # softmax temperature of the votes
    eval_workers: int = 1  # render processes during the final evaluation
    final_eval: bool = True  # run the full library/query evaluation at the end
    log_every: int = 10  # steps between metrics.jsonl lines
    progress: bool = True  # rich progress bar

    def __post_init__(self):
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision: {self.precision!r} is not auto, fp32, bf16 or fp16")
        if self.batch_size < 2:
            raise ValueError(f"batch_size: contrastive training needs at least 2 pages per batch, got {self.batch_size}")
        if not 0.0 <= self.clean_fraction <= 1.0:
            raise ValueError(f"clean_fraction: {self.clean_fraction} is not in [0, 1]")
        if not 0.0 <= self.signal_fraction <= 1.0:
            raise ValueError(f"signal_fraction: {self.signal_fraction} is not in [0, 1]")

    def resume_key(self) -> str:
        """Hash of the fields that define the optimisation path (a resumed run must share them)."""
        skip = {"resume", "progress", "log_every", "eval_workers", "final_eval", "workers", "prefetch_factor",
                "threads", "max_minutes", "epochs", "max_steps", "eval_presets", "val_every", "db", "run_dir"}
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_config(config_path: str | Path | None, overrides: dict | list[str] | None = None) -> EncoderTrainConfig:
    """YAML -> EncoderTrainConfig; overrides are a dict (None = keep) or `key=value` strings (values parsed as
    YAML, `key=null` = None); see rag_ecg.config."""
    return _load_config(EncoderTrainConfig, config_path, overrides)
