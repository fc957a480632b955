"""The trace segmenter recipe's config: every field of one run (a comment each), loaded from YAML + overrides
and saved beside its outputs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rag_ecg.config import load_config as _load_config
from rag_ecg.paper.presets import PRESETS
from rag_ecg.paper.segmenter import SegmenterConfig


@dataclass
class SegmenterTrainConfig:
    """One segmenter training run; saved beside its outputs as config.yaml."""

    widths: list[int] = field(default_factory=lambda: [24, 32, 48, 64])  # U-Net channels per level
    fold: int = 4  # pixel-unshuffle factor of the network (convolutions run at 1/fold resolution)
    convs: int = 2  # 3x3 convolutions per level and direction
    ptbxl: str | None = None  # PTB-XL folder (None: <shared data>/ptbxl)
    train_folds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 7, 8])  # records drawn for training
    val_folds: list[int] = field(default_factory=lambda: [9])  # records of the validation pages (figures only)
    limit_records: int | None = None  # use only the first N training records (smoke runs)
    presets: list[str] = field(default_factory=lambda: list(PRESETS))  # artifact presets, drawn uniformly
    dpi_range: list[int] = field(default_factory=lambda: [90, 220])  # render resolution, drawn uniformly
    zoom_range: list[float] = field(default_factory=lambda: [0.75, 1.35])  # scale around the working width
    augment: float = 0.0  # share of pages given grey pens, grey prints or low-resolution blur (`pen_variety`)
    work_width: int = 1600  # pages are resized to this many columns (the digitiser's working page), then zoomed
    crop: int = 256  # training crop side, working px
    pool: int = 8  # rendered pages kept; `pages_per_step` of them are replaced each step
    pages_per_step: float = 1.0  # fresh pages per optimizer step (fractions: one every 1/x steps)
    run_dir: str = "runs/segmenter"  # outputs (relative paths are under the project root)
    steps: int = 2000  # optimizer steps in total (the LR schedule spans them)
    max_minutes: float = 0.0  # > 0: stop training here (the schedule is not shortened; weights are saved)
    batch_size: int = 8  # crops per optimizer step
    lr: float = 3e-3  # peak AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup_steps: int = 50  # linear warm-up steps before the cosine decay
    min_lr_ratio: float = 0.05  # cosine floor as a fraction of lr
    dice_weight: float = 1.0  # loss = BCE + dice_weight * soft dice (traces are ~2-5 % of pixels)
    pos_weight: float = 3.0  # BCE weight of trace pixels
    threads: int = 1  # torch CPU threads (data is drawn in the same process)
    seed: int = 0  # weights init, page draws and crops
    save_every: int = 200  # steps between resumable checkpoints (run_dir/last)
    resume: bool = True  # continue from run_dir/last when its config matches
    log_every: int = 20  # steps between metrics.jsonl lines
    val_pages: int = 6  # fold-`val_folds` pages per preset in the final figures (0: none)
    val_presets: list[str] = field(default_factory=lambda: ["clean", "scan", "photo", "random"])  # presets scored

    def __post_init__(self):
        bad = [p for p in list(self.presets) + list(self.val_presets) if p not in PRESETS]
        if bad:
            raise ValueError(f"presets: {bad} not among {', '.join(PRESETS)}")
        SegmenterConfig(**self.net_config())  # the network's own checks (fold, widths, convs)
        if self.crop % (self.fold * 2 ** (len(self.widths) - 1)):
            raise ValueError(f"crop: {self.crop} is not a multiple of fold x 2^(levels-1) = "
                             f"{self.fold * 2 ** (len(self.widths) - 1)}")
        if self.batch_size < 1 or self.steps < 1 or self.pool < 1:
            raise ValueError("batch_size, steps and pool must be at least 1")
        if len(self.dpi_range) != 2 or len(self.zoom_range) != 2:
            raise ValueError("dpi_range and zoom_range are [low, high]")
        if not 0 < self.pages_per_step <= self.pool:
            raise ValueError(f"pages_per_step: {self.pages_per_step} is not in (0, pool]")

    def net_config(self) -> dict:
        return {"widths": list(self.widths), "fold": self.fold, "convs": self.convs}

    def resume_key(self) -> dict:
        """The fields a resumed run must share (model shape, data and optimisation); `steps` may grow (the
        schedule then stretches to the new end)."""
        skip = {"resume", "log_every", "save_every", "max_minutes", "threads", "run_dir", "val_pages",
                "val_presets", "ptbxl", "steps"}
        return {k: v for k, v in self.__dict__.items() if k not in skip}


def load_config(config_path: str | Path | None, overrides: dict | list[str] | None = None) -> SegmenterTrainConfig:
    """YAML -> SegmenterTrainConfig; overrides are a dict (None = keep) or `key=value` strings (see rag_ecg.config)."""
    return _load_config(SegmenterTrainConfig, config_path, overrides)
