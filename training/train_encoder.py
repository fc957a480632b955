"""Contrastive training of the ECG encoder (CLIP loss on page image <-> case text, + superclass head).

Why this shape: ~1,450 PTB-XL training records are few, so every epoch renders every record afresh
(`render_page(preset="random")`, seed from (seed, epoch, index)): new layout, colours and print/scan/
photo artifacts each time, which is the augmentation. Rendering runs in DataLoader workers fed by a
sampler that yields (epoch, index) pairs across all epochs, so workers prefetch over epoch boundaries
and the optimiser never waits. The optional auxiliary head (multi-label BCE on the 5 superclasses,
on the normalised image embedding) shapes the very space kNN retrieval votes in.

Data: PTB-XL folds 1-8 of the case store train, fold 9 validates (PTB-XL's recommended split).
CPU: plain loop, fp32. GPU: bf16/fp16 autocast; several GPUs: `torchrun` (DDP from the usual env vars,
open_clip's ClipLoss gathers features across ranks).

Run layout under `run_dir`:
    config.yaml          the resolved config
    metrics.jsonl        one line per logged step, per epoch (train + quick validation) and the final eval
    last/                encoder checkpoint + train_state.pt (optimizer, scheduler, epoch, RNG): resumed
    encoder/             the final encoder checkpoint (manifest carries the evaluation metrics)

    python training/train_encoder.py --config training/configs/encoder_cpu.yaml [key=value ...]
    torchrun --standalone --nproc_per_node=8 training/train_encoder.py --config training/configs/encoder_gpu.yaml
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if __name__ == "__main__":  # run as a script (`torchrun training/train_encoder.py`): the checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from rag_ecg import paths
from rag_ecg.data.labels import SUPERCLASSES
from rag_ecg.encoder.configs import resolve_device
from rag_ecg.encoder.model import ECGEncoder
from rag_ecg.errors import ConfigError
from rag_ecg.redact import redact
from rag_ecg.eval.encoder_eval import evaluate_encoder, flat_metrics
from rag_ecg.eval.metrics import knn_scores, macro_auc, recall_at_k
from training.common import (Dist, MetricsLog, barrier, broadcast_int, real_url, save_config, setup_distributed,
                             shutdown_distributed, thread_guard)
from training.encoder_checkpoint import restore, resume_state, save_last
from training.encoder_config import EncoderTrainConfig, load_config
from training.encoder_data import (CaseSet, EpochBatches, RenderedPages, data_hash, load_cases, render_fixed,
                                   worker_init)
from training.encoder_objective import Objective, TrainModule, autocast, lr_lambda, param_groups

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- run state
@dataclass
class Schedule:
    """The epochs the LR schedule spans: a time budget may shorten it once, after the first epoch."""

    end: int  # epochs (counting from 0) the schedule ends at
    steps_per_epoch: int
    max_steps: int = 0  # > 0: the schedule ends there at the latest

    def total_steps(self) -> int:
        n = self.end * self.steps_per_epoch
        return min(n, self.max_steps) if self.max_steps else n


class _Progress:
    """A rich progress bar when enabled, silent otherwise."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=True)

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    def add(self, desc: str, total: int):
        return self.bar.add_task(desc, total=total, info="") if self.bar else None

    def advance(self, task, info: str) -> None:
        if self.bar:
            self.bar.update(task, advance=1, info=info)

    def remove(self, task) -> None:
        if self.bar:
            self.bar.remove_task(task)


@dataclass
class EncoderRun:
    """What one run carries from `setup` through `train_epoch` to `finalize`."""

    cfg: EncoderTrainConfig
    dist: Dist
    dev: str  # torch device string of this rank
    precision: str  # fp32 | bf16 | fp16
    run: Path  # run_dir, absolute
    metrics: MetricsLog
    train_set: CaseSet
    val_set: CaseSet
    descriptions: dict[str, str]
    data_hash: str
    encoder: ECGEncoder
    module: TrainModule
    ddp: torch.nn.Module  # `module`, wrapped in DDP under torchrun
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: Any  # GradScaler for fp16, else None
    objective: Objective
    autocast: Any
    schedule: Schedule
    batches: Iterator  # the DataLoader's iterator over every remaining epoch
    val_pixels: np.ndarray | None  # validation fold rendered once (rank 0, when val_every)
    start_epoch: int
    step: int
    epochs_done: int
    t0: float
    progress: _Progress
    stopped: str | None = None  # time_budget | max_steps | max_minutes once the run stops early


# ---------------------------------------------------------------------------------------------- recipe
def train(cfg: EncoderTrainConfig, store=None) -> Path:
    """Train (or resume) and evaluate; returns the final encoder checkpoint folder."""
    if store is None:  # a resume from the run's own config.yaml holds the store URL with its password masked
        cfg = dataclasses.replace(cfg, db=real_url(cfg.db, "db", "--db (cli.py train-encoder) or --set db=URL"))
    # Oversubscribed OpenMP threads spin at barriers: on 2 cores, 2 torch threads beside a render worker
    # ran the tiny model 5-10x slower than 1 thread. Default: one thread per core left to the trainer.
    with thread_guard(cfg.threads or max(1, (os.cpu_count() or 1) - cfg.workers)):
        r = setup(cfg, store)
        with r.progress:
            for epoch in range(r.start_epoch, cfg.epochs):
                if not train_epoch(r, epoch):
                    break
        return finalize(r)


def setup(cfg: EncoderTrainConfig, store=None) -> EncoderRun:
    """Devices and process group, data, model, optimizer and schedule, resumed from run_dir/last if saved."""
    dev = resolve_device(cfg.device)
    if dev == "cuda":
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    dist = setup_distributed(dev)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if dev.startswith("cuda") else "fp32")
    if precision != "fp32" and not dev.startswith("cuda"):
        raise ConfigError(f"precision {precision}: mixed precision needs CUDA (use fp32 on CPU)")
    run = Path(cfg.run_dir)
    run = run if run.is_absolute() else paths.PROJECT_ROOT / run
    metrics = MetricsLog(run / "metrics.jsonl", dist.main, timestamps=True)
    saved = resume_state(run / "last", cfg)

    # ---- data
    train_set, descriptions = load_cases(cfg, cfg.train_folds, cfg.limit_train, store=store)
    val_set, _ = load_cases(cfg, cfg.val_folds, cfg.limit_val, descriptions, store=store)
    hash_ = data_hash(train_set.keys, val_set.keys)
    if dist.main:
        log.info(f"train: {len(train_set.records)} cases (folds {cfg.train_folds}); "
                 f"val: {len(val_set.records)} (folds {cfg.val_folds}); data {hash_[:12]}")

    # ---- model, optimizer, schedule
    encoder = ECGEncoder.create(cfg.model, device=dev, seed=cfg.seed,
                                aux_classes=SUPERCLASSES if cfg.aux_weight > 0 else (),
                                model_overrides=cfg.model_overrides or None)
    module = TrainModule(encoder).to(dev)
    tokens = encoder.tokenizer(train_set.texts)
    probe = EpochBatches(len(train_set.records), cfg.batch_size, cfg.seed, 0, cfg.epochs, dist.rank, dist.world)
    schedule = Schedule(min(cfg.epochs, int((saved or {}).get("planned_epochs") or cfg.epochs)),
                        probe.steps_per_epoch, cfg.max_steps)
    opt = torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(cfg.warmup_steps, schedule.total_steps(), cfg.min_lr_ratio)(s))
    start_epoch, step = restore(run / "last", saved, encoder, opt, sched, dev)
    if saved is not None and dist.main:
        log.info(f"resumed from {run / 'last'}: epoch {saved['epoch']}, step {saved['step']}")
    if dist.main:
        save_config(cfg, run / "config.yaml")
    ddp = module
    if dist.world > 1:
        ddp = DistributedDataParallel(module, device_ids=[dist.local_rank] if dev.startswith("cuda") else None)

    # ---- loader over every remaining epoch
    dataset = RenderedPages(train_set, tokens, encoder.preprocess, cfg.render_preset, cfg.clean_fraction,
                            cfg.dpi, cfg.seed, cfg.signal_fraction)
    sampler = EpochBatches(len(dataset), cfg.batch_size, cfg.seed, start_epoch, cfg.epochs, dist.rank, dist.world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=dev.startswith("cuda"),
        persistent_workers=False, worker_init_fn=worker_init if cfg.workers else None,
        prefetch_factor=cfg.prefetch_factor if cfg.workers else None)
    val_pixels = None
    if cfg.val_every and dist.main:
        val_pixels = render_fixed(val_set, encoder.preprocess, cfg.render_preset, cfg.dpi, cfg.seed)
    return EncoderRun(
        cfg=cfg, dist=dist, dev=dev, precision=precision, run=run, metrics=metrics, train_set=train_set,
        val_set=val_set, descriptions=descriptions, data_hash=hash_, encoder=encoder, module=module, ddp=ddp,
        opt=opt, sched=sched, scaler=torch.amp.GradScaler("cuda") if precision == "fp16" else None,
        objective=Objective(cfg.aux_weight, dist.rank, dist.world), autocast=autocast(precision),
        schedule=schedule, t0=time.time(), batches=iter(loader), val_pixels=val_pixels, start_epoch=start_epoch,
        step=step, epochs_done=start_epoch, progress=_Progress(cfg.progress and dist.main))


def train_epoch(r: EncoderRun, epoch: int) -> bool:
    """One epoch of optimizer steps, then its metrics line, quick validation and resumable checkpoint;
    False when the run stops here (schedule done, max_steps, max_minutes)."""
    cfg = r.cfg
    if epoch >= r.schedule.end:
        r.stopped = "time_budget"  # the schedule was fitted to max_minutes and is complete
        return False
    if cfg.max_steps and r.step >= cfg.max_steps:
        r.stopped = "max_steps"
        return False
    r.module.train()
    sums: dict[str, float] = {}
    n_batches = 0
    task = r.progress.add(f"epoch {epoch + 1}/{r.schedule.end}", r.schedule.steps_per_epoch)
    for _ in range(r.schedule.steps_per_epoch):
        parts = _optimizer_step(r)
        n_batches += 1
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        r.progress.advance(task, f"loss {parts['loss']:.3f}")
        if cfg.log_every and r.step % cfg.log_every == 0:
            r.metrics.write({"step": r.step, "epoch": epoch + 1, "lr": r.sched.get_last_lr()[0],
                             "logit_scale": float(r.encoder.model.logit_scale.detach().exp()), **parts})
        if (cfg.max_steps and r.step >= cfg.max_steps) or \
                (cfg.max_minutes and time.time() - r.t0 > cfg.max_minutes * 60):
            r.stopped = "max_steps" if cfg.max_steps and r.step >= cfg.max_steps else "max_minutes"
            break
    r.progress.remove(task)
    _end_epoch(r, epoch, sums, n_batches)
    return r.stopped is None


def _optimizer_step(r: EncoderRun) -> dict[str, float]:
    """One batch forward and backward, clipped, stepped; the loss parts as floats."""
    pixels, tok, labels = next(r.batches)
    pixels = r.encoder.model_input(pixels)
    tok, labels = tok.to(r.dev, non_blocking=True), labels.to(r.dev, non_blocking=True)
    with r.autocast:
        img, txt, scale, aux = r.ddp(pixels, tok)
    loss, parts = r.objective(img, txt, scale, aux, labels)
    r.opt.zero_grad(set_to_none=True)
    if r.scaler is not None:
        r.scaler.scale(loss).backward()
        r.scaler.unscale_(r.opt)
    else:
        loss.backward()
    if r.cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(r.module.parameters(), r.cfg.grad_clip)
    if r.scaler is not None:
        r.scaler.step(r.opt)
        r.scaler.update()
    else:
        r.opt.step()
    r.sched.step()
    with torch.no_grad():
        r.encoder.model.logit_scale.clamp_(0, math.log(100))
    r.step += 1
    return parts


def _end_epoch(r: EncoderRun, epoch: int, sums: dict[str, float], n_batches: int) -> None:
    """The epoch's metrics line (+ quick validation); the time budget fitted after the first epoch; the
    resumable checkpoint after a whole epoch."""
    cfg, dist = r.cfg, r.dist
    epoch_done = n_batches == r.schedule.steps_per_epoch  # a partial epoch is not a resumable boundary
    r.epochs_done = epoch + 1 if epoch_done else r.epochs_done
    record = {"epoch": epoch + 1, "step": r.step, "minutes": (time.time() - r.t0) / 60,
              **{f"train_{k}": v / max(1, n_batches) for k, v in sums.items()}}
    r.encoder.mark_modified()
    if dist.main and r.val_pixels is not None and (epoch + 1) % cfg.val_every == 0:
        record.update(quick_validation(r.encoder, r.val_pixels, r.val_set, cfg, r.objective.aux_weight))
    if epoch == r.start_epoch and epoch_done and cfg.max_minutes:
        fit = _fit_epochs(time.time() - r.t0, cfg.max_minutes, r.start_epoch, r.schedule.end, dist)
        if fit < r.schedule.end:
            if dist.main:
                log.info(f"time budget: {cfg.max_minutes:g} min fits {fit} epochs at "
                         f"{(time.time() - r.t0) / 60:.1f} min each; the schedule now ends there")
            record["planned_epochs"] = r.schedule.end = fit
    if dist.main:
        r.metrics.write(record)
        log.info(_epoch_line(record))
        if epoch_done:
            save_last(r.run / "last", r.encoder, r.opt, r.sched, epoch + 1, r.step, cfg, r.data_hash,
                      r.schedule.end if r.schedule.end < cfg.epochs else None)
    barrier(dist)


def _fit_epochs(first_epoch_s: float, max_minutes: float, start_epoch: int, end: int, dist: Dist) -> int:
    """How many epochs (counting from 0) fit in the budget at the first epoch's pace; rank 0 decides."""
    fit = min(end, start_epoch + max(1, int(max_minutes * 60 // max(first_epoch_s, 1e-6))))
    return broadcast_int(fit, dist)


def finalize(r: EncoderRun) -> Path:
    """Full library/query evaluation and the final checkpoint (rank 0); leaves the process group."""
    cfg, dist = r.cfg, r.dist
    out = r.run / "encoder"
    if dist.main:
        minutes = (time.time() - r.t0) / 60
        metrics: dict[str, Any] = {}
        if cfg.final_eval:
            log.info("final evaluation: rendering the library and the queries")
            result = evaluate_encoder(r.encoder, r.train_set.records, r.val_set.records, cfg.eval_presets,
                                      k=cfg.eval_k, temperature=cfg.eval_temperature, descriptions=r.descriptions,
                                      dpi=cfg.dpi, workers=cfg.eval_workers)
            metrics = flat_metrics(result)
            r.metrics.write({"final": result})
            log.info(summarize(result))
        r.encoder.save(out, training_data_hash=r.data_hash, metrics=metrics,
                       training={"config": redact(dataclasses.asdict(cfg)), "steps": r.step, "epochs_done": r.epochs_done,
                                 "train_minutes": round(minutes, 2),
                                 "stopped": r.stopped or "completed", "world_size": dist.world,
                                 "precision": r.precision, "device": r.dev})
        log.info(f"encoder saved to {out} (hash {r.encoder.checkpoint_hash[:12]})")
    barrier(dist)
    shutdown_distributed(dist)
    return out


def quick_validation(encoder, val_pixels, val_set: CaseSet, cfg: EncoderTrainConfig, aux_weight: float) -> dict:
    """Cheap per-epoch signal on the validation fold (pages rendered once): CLIP loss on the whole fold,
    image->report recall, superclass AUC of the aux head, and leave-one-patient-out kNN AUC within it."""
    enc = encoder
    img = enc.embed_pixels(val_pixels)
    uniq = sorted(set(val_set.texts))
    txt = enc.embed_texts(uniq)
    idx = np.array([uniq.index(t) for t in val_set.texts])
    rel = idx[:, None] == np.arange(len(uniq))[None, :]
    scale = float(enc.model.logit_scale.detach().exp())
    logits = torch.from_numpy(scale * img @ txt[idx].T)
    target = torch.arange(len(idx))
    val_loss = float((F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2)
    out = {"val_clip_loss": val_loss, **{f"val_i2t_{k}": v for k, v in recall_at_k(img @ txt.T, rel, (1, 5)).items()}}
    groups = [r.patient_id or r.record_id for r in val_set.records]
    if len(img) > cfg.eval_k:
        s = knn_scores(img, img, val_set.labels, cfg.eval_k, cfg.eval_temperature, groups, groups)
        out["val_knn_loo_auc"] = macro_auc(val_set.labels, s)
    if enc.aux_head is not None:
        with torch.inference_mode():
            enc.aux_head.eval()
            p = torch.sigmoid(enc.aux_logits(torch.from_numpy(img).to(enc.device))).cpu().numpy()
        out["val_aux_auc"] = macro_auc(val_set.labels, p)
    return out


# ---------------------------------------------------------------------------------------------- output
def _epoch_line(r: dict) -> str:
    keys = ["train_loss", "train_clip_loss", "train_aux_loss", "val_clip_loss", "val_i2t_R@1", "val_aux_auc",
            "val_knn_loo_auc"]
    parts = [f"{k.replace('train_', '')}={r[k]:.3f}" for k in keys if k in r]
    return f"epoch {r['epoch']} step {r['step']} ({r['minutes']:.1f} min): " + " ".join(parts)


def summarize(result: dict) -> str:
    """One line per query preset of an `evaluate_encoder` result (what the CLI prints)."""
    lines = []
    for p, m in result.items():
        if isinstance(m, dict) and "auc" in m:
            lines.append(f"[{p} queries] kNN AUC {m['auc']:.3f} | binarised AUC {m['auc_binarized']:.3f} "
                         f"F1 {m['f1']:.3f} HL {m['hamming']:.3f} | image->report R@1 "
                         f"{m['image_to_report']['R@1']:.3f} R@5 {m['image_to_report']['R@5']:.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- entry points
def main(config_path: str | Path | None, overrides: dict | list[str] | None = None) -> Path:
    """Entry point for `cli.py train-encoder`: load config (+ overrides) and train; returns the checkpoint."""
    return train(load_config(config_path, overrides))


def evaluate_checkpoint(checkpoint: str | Path, db: str | None = None, presets: Sequence[str] = ("random", "clean"),
                        k: int = 10, temperature: float = 0.05, dpi: int | None = None, workers: int = 1,
                        device: str = "cpu", limit_library: int | None = None, limit_queries: int | None = None,
                        train_folds: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8), val_folds: Sequence[int] = (9,),
                        store=None) -> dict:
    """Entry point for `cli.py eval-encoder CHECKPOINT`: fold-9 queries vs the folds 1-8 library.

    `dpi=None` renders at the dpi the checkpoint was trained with (100 if unknown). Print the result
    with `summarize(result)`; `rag_ecg.eval.encoder_eval.flat_metrics(result)` flattens it for JSON.
    """
    encoder = ECGEncoder.load(checkpoint, device=device)
    if dpi is None:
        dpi = int(encoder.manifest.get("training", {}).get("config", {}).get("dpi") or 100)
    cfg = EncoderTrainConfig(db=db, train_folds=list(train_folds), val_folds=list(val_folds))
    lib, descriptions = load_cases(cfg, cfg.train_folds, limit_library, store=store)
    val, _ = load_cases(cfg, cfg.val_folds, limit_queries, descriptions, store=store)
    return evaluate_encoder(encoder, lib.records, val.records, list(presets), k=k, temperature=temperature,
                            descriptions=descriptions, dpi=dpi, workers=workers)


def _cli(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description="Contrastive training of the rag-ecg image/report encoder.")
    ap.add_argument("--config", required=True, help="YAML config (training/configs/encoder_*.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (values parsed as YAML)")
    a = ap.parse_args(argv)
    return main(a.config, list(a.overrides))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(_cli(sys.argv[1:]))
