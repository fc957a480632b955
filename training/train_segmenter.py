"""Training of the trace segmenter (`rag_ecg.paper.segmenter`) on the renderer's own pixel-exact trace labels.

Why this shape: every page the renderer draws, under every artifact preset, comes with the exact mask of
the pixels its pens drew (`rag_ecg.paper.trace_labels`), so labels are free and unlimited; PTB-XL records
of folds 1-8 are drawn on random layouts, resolutions and presets, resized to the digitiser's working width
(zoomed a little either way) and cut into crops (`segmenter_data`). Loss: BCE (trace pixels weighted up)
+ soft dice, since traces are ~2-5 % of a page. One CPU thread draws and trains in turn.

Run layout under `run_dir`:
    config.yaml                 the resolved config
    metrics.jsonl               one line per logged step, and the final figures
    last/                       resumable: segmenter.safetensors (+ .json) and train_state.pt
    segmenter.safetensors/.json the final weights; the manifest holds the config, data and figures

    python cli.py train-segmenter --config training/configs/segmenter.yaml [--export]
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: the checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

from rag_ecg import paths
from rag_ecg.errors import ArtifactError, ConfigError
from rag_ecg.io import atomic_dir, atomic_write_with
from rag_ecg.paper.ink import INK_ON, ink_map
from rag_ecg.paper.segmenter import (DEFAULT_WEIGHTS, SegmenterConfig, TraceSegmenter, TraceUNet, load_segmenter,
                                     save_segmenter)
from training.common import MetricsLog, rng_state, save_config, set_rng_state, thread_guard
from training.segmenter_config import SegmenterTrainConfig, load_config
from training.segmenter_data import PagePool, draw_page, ptbxl_rows

log = logging.getLogger(__name__)
WEIGHTS = "segmenter.safetensors"
STATE_FILE = "train_state.pt"


# ---------------------------------------------------------------------------------------------- pieces
def loss_fn(logits: torch.Tensor, target: torch.Tensor, pos_weight: float, dice_weight: float) -> torch.Tensor:
    """Weighted BCE + soft dice over the batch (dice keeps the few trace pixels from being ignored)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(pos_weight))
    p = torch.sigmoid(logits)
    dice = 1.0 - (2.0 * (p * target).sum() + 1.0) / (p.sum() + target.sum() + 1.0)
    return bce + dice_weight * dice


def to_tensors(xs: np.ndarray, ys: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(xs).permute(0, 3, 1, 2).float().div_(255.0)
    y = torch.from_numpy(ys.astype(np.float32))[:, None]
    return x, y


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up, then cosine decay to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def f1(pred: np.ndarray, truth: np.ndarray) -> float:
    """Trace-pixel F1 of two boolean masks."""
    tp = float(np.count_nonzero(pred & truth))
    return 2.0 * tp / max(1.0, float(np.count_nonzero(pred) + np.count_nonzero(truth)))


def evaluate(seg: TraceSegmenter, cfg: SegmenterTrainConfig, seed: int = 9000) -> dict:
    """Trace-pixel F1 (and seconds per page) of the segmenter vs the classical ink map (> INK_ON) on whole
    working pages of the validation folds, per preset."""
    rows = ptbxl_rows(cfg, cfg.val_folds)[: cfg.val_pages]
    out = {}
    for preset in cfg.val_presets:
        seg_f1, ink_f1, secs = [], [], 0.0
        for i, row in enumerate(rows):
            page, mask = draw_page(cfg, row, seed + i, preset=preset, zoom=False)
            t = time.perf_counter()
            pred = seg.trace_map(page) > INK_ON
            secs += time.perf_counter() - t
            seg_f1.append(f1(pred, mask))
            ink_f1.append(f1(ink_map(page) > INK_ON, mask))
        out[preset] = {"pages": len(rows), "segmenter_f1": float(np.mean(seg_f1)), "ink_map_f1": float(np.mean(ink_f1)),
                       "segmenter_s_per_page": secs / max(1, len(rows))}
    return out


# ---------------------------------------------------------------------------------------------- checkpoints
def _save_last(d: Path, net: TraceUNet, opt, step: int, drawn: int, cfg: SegmenterTrainConfig) -> None:
    with atomic_dir(d) as tmp:
        save_segmenter(net, tmp / WEIGHTS, training={"step": step})
        state = {"step": step, "drawn": drawn, "resume_key": repr(sorted(cfg.resume_key().items())),
                 "optimizer": opt.state_dict(), "rng": rng_state()}
        atomic_write_with(tmp / STATE_FILE, lambda t: torch.save(state, t))


def _resume(d: Path, net: TraceUNet, opt, cfg: SegmenterTrainConfig) -> tuple[int, int]:
    """(step, pages drawn) restored from run_dir/last, or (0, 0)."""
    if not cfg.resume or not (d / STATE_FILE).is_file():
        return 0, 0
    state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
    if state.get("resume_key") != repr(sorted(cfg.resume_key().items())):
        raise ConfigError(f"{d}: the saved run used another config; use a new run_dir or resume=false")
    try:
        net.load_state_dict(load_segmenter(d / WEIGHTS).trained.state_dict())
    except ArtifactError as exc:
        raise ArtifactError(f"{d}: cannot resume ({exc})") from None
    opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return int(state["step"]), int(state["drawn"])


# ---------------------------------------------------------------------------------------------- recipe
def train(cfg: SegmenterTrainConfig, export: str | Path | None = None) -> Path:
    """Train (or resume), score on the validation pages, save run_dir/segmenter.safetensors; with `export`,
    also write the weights + manifest there (the shipped model: `rag_ecg.paper.segmenter.DEFAULT_WEIGHTS`)."""
    with thread_guard(cfg.threads):
        run = Path(cfg.run_dir)
        run = run if run.is_absolute() else paths.PROJECT_ROOT / run
        metrics = MetricsLog(run / "metrics.jsonl", timestamps=True)
        torch.manual_seed(cfg.seed)
        net = TraceUNet(SegmenterConfig(**cfg.net_config()))
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = lambda s: cfg.lr * lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)  # noqa: E731
        step, drawn = _resume(run / "last", net, opt, cfg)
        rows = ptbxl_rows(cfg, cfg.train_folds, cfg.limit_records)
        pool = PagePool(cfg, rows, cfg.seed + 7919 * step)  # a resumed run draws a fresh stream of crops
        pool.skip_to(drawn)
        save_config(cfg, run / "config.yaml")
        log.info(f"segmenter: {sum(p.numel() for p in net.parameters())} weights; {len(rows)} training records "
                 f"(folds {cfg.train_folds}); from step {step}")
        t0, sums, n, stopped = time.time(), 0.0, 0, "completed"
        net.train()
        while step < cfg.steps:
            if cfg.max_minutes and time.time() - t0 > cfg.max_minutes * 60:
                stopped = "max_minutes"
                break
            x, y = to_tensors(*pool.batch(cfg.batch_size, cfg.crop))
            for g in opt.param_groups:
                g["lr"] = sched(step)
            loss = loss_fn(net(x), y, cfg.pos_weight, cfg.dice_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sums, n = sums + float(loss.detach()), n + 1
            if cfg.log_every and step % cfg.log_every == 0:
                metrics.write({"step": step, "loss": sums / n, "lr": sched(step - 1), "pages": pool.drawn,
                               "minutes": (time.time() - t0) / 60})
                log.info(f"step {step}/{cfg.steps} loss {sums / n:.4f} ({(time.time() - t0) / 60:.1f} min)")
                sums, n = 0.0, 0
            if cfg.save_every and step % cfg.save_every == 0:
                _save_last(run / "last", net, opt, step, pool.drawn, cfg)
        minutes = (time.time() - t0) / 60
        seg = TraceSegmenter(net.eval())
        figures = evaluate(seg, cfg) if cfg.val_pages else {}
        if figures:
            metrics.write({"final": figures})
            for p, m in figures.items():
                log.info(f"[{p}] trace F1 segmenter {m['segmenter_f1']:.3f} vs ink map {m['ink_map_f1']:.3f} "
                         f"({m['segmenter_s_per_page']:.2f} s/page)")
        info = {"training": {"config": dataclasses.asdict(cfg), "steps": step, "train_minutes": round(minutes, 2),
                             "stopped": stopped, "pages_drawn": pool.drawn,
                             "data": f"PTB-XL folds {cfg.train_folds} ({len(rows)} records), rendered by "
                                     f"rag_ecg.paper.render under presets {cfg.presets}"},
                "figures": {"val_folds": cfg.val_folds, "trace_pixel_f1": figures}}
        out = save_segmenter(net, run / WEIGHTS, **info)
        log.info(f"segmenter saved to {out}")
        if export:
            out = save_segmenter(net, Path(export), **info)
            log.info(f"exported to {out}")
        return out


def main(config_path: str | Path | None, overrides: dict | list[str] | None = None,
         export: bool | str | Path = False) -> Path:
    """Entry point for `cli.py train-segmenter`; `export=True` writes the shipped weights."""
    target = DEFAULT_WEIGHTS if export is True else (export or None)
    return train(load_config(config_path, overrides), target)


def _cli(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description="Train the rag-ecg trace segmenter.")
    ap.add_argument("--config", required=True, help="YAML config (training/configs/segmenter*.yaml)")
    ap.add_argument("--export", action="store_true", help=f"also write the shipped weights ({DEFAULT_WEIGHTS})")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (values parsed as YAML)")
    a = ap.parse_args(argv)
    return main(a.config, list(a.overrides), a.export)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(_cli(sys.argv[1:]))
