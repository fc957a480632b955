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
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

STATE_FILE = "train_state.pt"
VAL_STREAM = 1 << 30  # the "epoch" of the fixed validation renders (no training epoch gets there)


# ---------------------------------------------------------------------------------------------- config
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
    """YAML -> EncoderTrainConfig; overrides are a dict or `key=value` strings (values parsed as YAML)."""
    import yaml

    data: dict = {}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    if isinstance(overrides, (list, tuple)):
        parsed = {}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r}: expected key=value")
            k, v = item.split("=", 1)
            parsed[k.strip().replace("-", "_")] = yaml.safe_load(v)
        overrides = parsed
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in dataclasses.fields(EncoderTrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{config_path or 'overrides'}: unknown config field(s) {', '.join(unknown)}")
    return EncoderTrainConfig(**_coerce(data))


def _coerce(data: dict) -> dict:
    """YAML reads `1e-4` as a string: turn strings into the float/int a field declares; say which field failed."""
    types = {f.name: str(f.type) for f in dataclasses.fields(EncoderTrainConfig)}
    out = dict(data)
    for k, v in data.items():
        t = types[k].replace(" | None", "")
        if isinstance(v, str) and t in ("float", "int"):
            try:
                out[k] = float(v) if t == "float" else int(v)
            except ValueError:
                raise ValueError(f"{k}: {v!r} is not a valid {t}") from None
        elif isinstance(v, int) and not isinstance(v, bool) and t == "float":
            out[k] = float(v)
    return out


# ---------------------------------------------------------------------------------------------- data
@dataclass
class CaseSet:
    """Records of one split with what training needs precomputed (text tokens, label matrix)."""

    records: list  # ECGRecord, signals in memory
    texts: list[str]  # case_text of each record
    labels: np.ndarray  # (n, 5) uint8 superclass indicators
    keys: list[str]  # "source:external_id" (for the data hash)


def load_cases(cfg: EncoderTrainConfig, folds: Sequence[int], limit: int | None, descriptions: dict | None = None,
               store=None) -> tuple[CaseSet, dict[str, str]]:
    """Read the cases of `folds` (and `cfg.sources`) from the store, signals included."""
    from sqlalchemy import select

    from rag_ecg.encoder.model import case_text
    from rag_ecg.eval.metrics import labels_to_matrix
    from rag_ecg.data.store import Case, open_store, scp_descriptions

    own = store is None
    store = store or open_store(cfg.db)
    try:
        with store.session() as s:
            q = select(Case).where(Case.fold.in_(list(folds))).order_by(Case.id)
            if cfg.sources:
                q = q.where(Case.source.in_(list(cfg.sources)))
            cases = list(s.scalars(q))
            if descriptions is None:
                descriptions = scp_descriptions(s)
    finally:
        if own:
            store.dispose()
    if limit:
        cases = cases[:limit]
    if not cases:
        raise ValueError(f"{store!r}: no cases of source(s) {cfg.sources} in fold(s) {list(folds)} "
                         "(run `python cli.py ingest ptbxl ...` first)")
    records = _load_records(cases, processes=os.cpu_count() or 1)
    texts = [case_text(r.report, r.codes, descriptions) for r in records]
    labels = labels_to_matrix([r.labels for r in records])
    keys = [f"{c.source}:{c.external_id}" for c in cases]
    return CaseSet(records, texts, labels, keys), descriptions


_CASE_FIELDS = ("source", "external_id", "signal_path", "patient_id", "age", "sex", "report", "codes", "labels",
                "fold")


def _load_one(fields: dict):
    from types import SimpleNamespace

    from rag_ecg.data.store import load_case_record

    return load_case_record(SimpleNamespace(**fields))


def _load_records(cases, processes: int) -> list:
    """Signals of the cases (WFDB reads dominate start-up: spread them over processes)."""
    rows = [{k: getattr(c, k) for k in _CASE_FIELDS} for c in cases]
    if processes <= 1 or len(rows) < 64:
        return [_load_one(r) for r in rows]
    import multiprocessing as mp

    with mp.get_context("fork").Pool(processes) as pool:
        return pool.map(_load_one, rows, chunksize=32)


def render_seed(seed: int, epoch: int, index: int) -> int:
    """The render seed of one (epoch, record): independent streams, stable across runs and workers."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0] & 0x7FFFFFFF)


class RenderedPages:
    """Map-style dataset: (epoch, index) -> (model input from `preprocess.pixels`, tokens (L,) int64,
    labels (5,) float32).

    Each key renders its record afresh with a seed from (seed, epoch, index), so an epoch never repeats
    a page and a resumed run redraws exactly the pages it would have. For a trace tower a seeded share
    (`signal_fraction`) skips the page and reads the record's signal in a random printed layout: the
    tower sees clean and digitised traces of the same ECGs, ~100x cheaper than a render.
    """

    def __init__(self, cases: CaseSet, tokens, preprocess, preset: str, clean_fraction: float, dpi: int, seed: int,
                 signal_fraction: float = 0.0):
        self.cases, self.tokens, self.preprocess = cases, tokens, preprocess
        self.preset, self.clean_fraction, self.dpi, self.seed = preset, clean_fraction, dpi, seed
        # only a trace tower can read a signal directly; image towers always get rendered pages
        self.signal_fraction = signal_fraction if hasattr(preprocess, "from_signal") else 0.0

    def __len__(self) -> int:
        return len(self.cases.records)

    def page(self, epoch: int, index: int):
        from rag_ecg.paper.render import render_page

        s = render_seed(self.seed, epoch, index)
        preset = self.preset
        if self.clean_fraction and random.Random(s).random() < self.clean_fraction:
            preset = "clean"
        return render_page(self.cases.records[index], preset=preset, seed=s, dpi=self.dpi)

    def __getitem__(self, key: tuple[int, int]):
        import torch

        epoch, index = key
        s = render_seed(self.seed, epoch, index)
        if self.signal_fraction and random.Random(s ^ 0x5167).random() < self.signal_fraction:
            pixels = self.preprocess.from_signal(self.cases.records[index], np.random.default_rng(s))
        else:
            pixels = self.preprocess.pixels(self.page(epoch, index), strict=False)
        return (torch.from_numpy(pixels), self.tokens[index],
                torch.from_numpy(self.cases.labels[index].astype(np.float32)))


class EpochBatches:
    """Batch sampler over all remaining epochs: lists of (epoch, index), a fresh permutation per epoch,
    sharded by rank, full batches only (every rank takes the same number of steps)."""

    def __init__(self, n: int, batch_size: int, seed: int, start_epoch: int, epochs: int, rank: int = 0,
                 world: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_epoch, self.epochs, self.rank, self.world = start_epoch, epochs, rank, world
        self.steps_per_epoch = (n // world) // batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"{n} training cases cannot fill one batch of {batch_size} per process "
                             f"({world} process(es)): lower batch_size")

    def __len__(self) -> int:
        return (self.epochs - self.start_epoch) * self.steps_per_epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch in range(self.start_epoch, self.epochs):
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            mine = perm[self.rank::self.world][: self.steps_per_epoch * self.batch_size]
            for b in range(self.steps_per_epoch):
                yield [(epoch, int(i)) for i in mine[b * self.batch_size:(b + 1) * self.batch_size]]


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)  # renders are numpy/Pillow; leave the cores to the trainer


# ---------------------------------------------------------------------------------------------- model + loss
def _train_module_class():
    import torch

    class TrainModule(torch.nn.Module):
        """CLIP + optional superclass head behind one forward (what DDP wraps)."""

        def __init__(self, encoder):
            super().__init__()
            self.clip, self.aux_head = encoder.model, encoder.aux_head
            self._aux = encoder.aux_logits

        def forward(self, pixels, tokens):
            import torch.nn.functional as F

            img = F.normalize(self.clip.encode_image(pixels), dim=-1)
            txt = F.normalize(self.clip.encode_text(tokens), dim=-1)
            aux = self._aux(img.float()) if self.aux_head is not None else None
            return img, txt, self.clip.logit_scale.exp(), aux

    return TrainModule


class Objective:
    """ClipLoss (open_clip) + aux_weight * multi-label BCE; returns (total, parts dict of floats)."""

    def __init__(self, aux_weight: float, rank: int = 0, world: int = 1):
        from open_clip import ClipLoss

        self.clip = ClipLoss(local_loss=world > 1, gather_with_grad=world > 1, cache_labels=True,
                             rank=rank, world_size=world)
        self.aux_weight = aux_weight

    def __call__(self, img, txt, scale, aux, labels):
        import torch.nn.functional as F

        clip = self.clip(img.float(), txt.float(), scale.float())
        parts = {"clip_loss": float(clip.detach())}
        total = clip
        if aux is not None and self.aux_weight > 0:
            bce = F.binary_cross_entropy_with_logits(aux.float(), labels)
            total = total + self.aux_weight * bce
            parts["aux_loss"] = float(bce.detach())
        parts["loss"] = float(total.detach())
        return total, parts


def param_groups(module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, norm gains, embeddings and the logit scale (CLIP practice)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name or ".bn" in name or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup: int, total: int, floor: float):
    """Linear warm-up then cosine from 1 to `floor` (multiplier of the peak lr) at `total` steps."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return f


# ---------------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """DDP from torchrun's env vars (WORLD_SIZE > 1); nothing is imported or initialised otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, world, local)


# ---------------------------------------------------------------------------------------------- training
def train(cfg: EncoderTrainConfig, store=None) -> Path:
    """Train (or resume) and evaluate; returns the final encoder checkpoint folder."""
    import torch

    threads = torch.get_num_threads()
    try:
        return _train(cfg, store)
    finally:
        torch.set_num_threads(threads)  # callers (tests, notebooks) keep their own setting


def _train(cfg: EncoderTrainConfig, store=None) -> Path:
    import torch

    from rag_ecg import paths
    from rag_ecg.encoder.model import ECGEncoder, resolve_device
    from rag_ecg.data.labels import SUPERCLASSES

    dev = resolve_device(cfg.device)
    if dev == "cuda":
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    dist_info = init_distributed(dev)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if dev.startswith("cuda") else "fp32")
    if precision != "fp32" and not dev.startswith("cuda"):
        raise ValueError(f"precision {precision}: mixed precision needs CUDA (use fp32 on CPU)")
    # Oversubscribed OpenMP threads spin at barriers: on 2 cores, 2 torch threads beside a render worker
    # ran the tiny model 5-10x slower than 1 thread. Default: one thread per core left to the trainer.
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) - cfg.workers))
    run = Path(cfg.run_dir)
    run = run if run.is_absolute() else paths.PROJECT_ROOT / run
    log = _Log(run / "metrics.jsonl", dist_info.main)
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if dist_info.main else (lambda m: None)

    resume_state = _resume_state(run / "last", cfg)

    # ---- data
    train_set, descriptions = load_cases(cfg, cfg.train_folds, cfg.limit_train, store=store)
    val_set, _ = load_cases(cfg, cfg.val_folds, cfg.limit_val, descriptions, store=store)
    data_hash = _data_hash(train_set.keys, val_set.keys)
    say(f"train: {len(train_set.records)} cases (folds {cfg.train_folds}); "
        f"val: {len(val_set.records)} (folds {cfg.val_folds}); data {data_hash[:12]}")

    # ---- model, optimizer, schedule
    encoder = ECGEncoder.create(cfg.model, device=dev, seed=cfg.seed,
                                aux_classes=SUPERCLASSES if cfg.aux_weight > 0 else (),
                                model_overrides=cfg.model_overrides or None)
    module = _train_module_class()(encoder).to(dev)
    tokens = encoder.tokenizer(train_set.texts)
    sampler_probe = EpochBatches(len(train_set.records), cfg.batch_size, cfg.seed, 0, cfg.epochs,
                                 dist_info.rank, dist_info.world)
    steps_per_epoch = sampler_probe.steps_per_epoch
    # the schedule spans `plan["end"]` epochs; a time budget may shorten it once, after the first epoch
    plan = {"end": min(cfg.epochs, int((resume_state or {}).get("planned_epochs") or cfg.epochs))}

    def total_steps() -> int:
        n = plan["end"] * steps_per_epoch
        return min(n, cfg.max_steps) if cfg.max_steps else n

    opt = torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                            eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(cfg.warmup_steps, total_steps(), cfg.min_lr_ratio)(s))
    start_epoch, step = _restore(run / "last", resume_state, encoder, opt, sched, dev, say)
    if dist_info.main:
        _save_config(cfg, run / "config.yaml")
    ddp = module
    if dist_info.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(module, device_ids=[dist_info.local_rank] if dev.startswith("cuda") else None)
    objective = Objective(cfg.aux_weight, dist_info.rank, dist_info.world)
    autocast = _autocast(dev, precision)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    # ---- loader over every remaining epoch
    dataset = RenderedPages(train_set, tokens, encoder.preprocess, cfg.render_preset, cfg.clean_fraction,
                            cfg.dpi, cfg.seed, cfg.signal_fraction)
    batches = EpochBatches(len(dataset), cfg.batch_size, cfg.seed, start_epoch, cfg.epochs,
                           dist_info.rank, dist_info.world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=cfg.workers, pin_memory=dev.startswith("cuda"),
        persistent_workers=False, worker_init_fn=_worker_init if cfg.workers else None,
        prefetch_factor=cfg.prefetch_factor if cfg.workers else None)
    val_pixels = None
    if cfg.val_every and dist_info.main:
        val_pixels = _render_fixed(val_set, encoder.preprocess, cfg.render_preset, cfg.dpi, cfg.seed)

    t0 = time.time()
    stopped = None
    epochs_done = start_epoch
    it = iter(loader)
    progress = _Progress(cfg.progress and dist_info.main)
    with progress:
        for epoch in range(start_epoch, cfg.epochs):
            if epoch >= plan["end"]:
                stopped = "time_budget"  # the schedule was fitted to max_minutes and is complete
                break
            if cfg.max_steps and step >= cfg.max_steps:
                stopped = "max_steps"
                break
            module.train()
            sums: dict[str, float] = {}
            n_batches = 0
            task = progress.add(f"epoch {epoch + 1}/{plan['end']}", steps_per_epoch)
            for _ in range(steps_per_epoch):
                pixels, tok, labels = next(it)
                pixels = encoder.model_input(pixels)
                tok, labels = tok.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
                with autocast:
                    img, txt, scale, aux = ddp(pixels, tok)
                loss, parts = objective(img, txt, scale, aux, labels)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                else:
                    loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                sched.step()
                with torch.no_grad():
                    encoder.model.logit_scale.clamp_(0, math.log(100))
                step += 1
                n_batches += 1
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                progress.advance(task, f"loss {parts['loss']:.3f}")
                if cfg.log_every and step % cfg.log_every == 0:
                    log.write({"step": step, "epoch": epoch + 1, "lr": sched.get_last_lr()[0],
                               "logit_scale": float(encoder.model.logit_scale.detach().exp()), **parts})
                if (cfg.max_steps and step >= cfg.max_steps) or \
                        (cfg.max_minutes and time.time() - t0 > cfg.max_minutes * 60):
                    stopped = "max_steps" if cfg.max_steps and step >= cfg.max_steps else "max_minutes"
                    break
            progress.remove(task)
            epoch_done = n_batches == steps_per_epoch  # a partial epoch is not a resumable boundary
            epochs_done = epoch + 1 if epoch_done else epochs_done
            record = {"epoch": epoch + 1, "step": step, "minutes": (time.time() - t0) / 60,
                      **{f"train_{k}": v / max(1, n_batches) for k, v in sums.items()}}
            encoder.mark_modified()
            if dist_info.main and val_pixels is not None and (epoch + 1) % cfg.val_every == 0:
                record.update(quick_validation(encoder, val_pixels, val_set, cfg, objective.aux_weight))
            if epoch == start_epoch and epoch_done and cfg.max_minutes:
                fit = _fit_epochs(time.time() - t0, cfg.max_minutes, start_epoch, plan["end"], dist_info)
                if fit < plan["end"]:
                    say(f"time budget: {cfg.max_minutes:g} min fits {fit} epochs at "
                        f"{(time.time() - t0) / 60:.1f} min each; the schedule now ends there")
                    record["planned_epochs"] = plan["end"] = fit
            if dist_info.main:
                log.write(record)
                say(_epoch_line(record))
                if epoch_done:
                    _save_last(run / "last", encoder, opt, sched, epoch + 1, step, cfg, data_hash,
                               plan["end"] if plan["end"] < cfg.epochs else None)
            _barrier(dist_info)
            if stopped:
                break

    # ---- final evaluation and checkpoint (rank 0)
    out = run / "encoder"
    if dist_info.main:
        minutes = (time.time() - t0) / 60
        metrics: dict[str, Any] = {}
        if cfg.final_eval:
            from rag_ecg.eval.metrics import evaluate_encoder, flat_metrics

            say("final evaluation: rendering the library and the queries")
            result = evaluate_encoder(encoder, train_set.records, val_set.records, cfg.eval_presets,
                                      k=cfg.eval_k, temperature=cfg.eval_temperature, descriptions=descriptions,
                                      dpi=cfg.dpi, workers=cfg.eval_workers, progress=say)
            metrics = flat_metrics(result)
            log.write({"final": result})
            say(summarize(result))
        encoder.save(out, training_data_hash=data_hash, metrics=metrics,
                     training={"config": dataclasses.asdict(cfg), "steps": step, "epochs_done": epochs_done,
                               "train_minutes": round(minutes, 2),
                               "stopped": stopped or "completed", "world_size": dist_info.world,
                               "precision": precision, "device": dev})
        say(f"encoder saved to {out} (hash {encoder.checkpoint_hash[:12]})")
    _barrier(dist_info)
    if dist_info.world > 1:
        import torch.distributed as tdist

        tdist.destroy_process_group()
    return out


def quick_validation(encoder, val_pixels, val_set: CaseSet, cfg: EncoderTrainConfig, aux_weight: float) -> dict:
    """Cheap per-epoch signal on the validation fold (pages rendered once): CLIP loss on the whole fold,
    image->report recall, superclass AUC of the aux head, and leave-one-patient-out kNN AUC within it."""
    import torch
    import torch.nn.functional as F

    from rag_ecg.eval.metrics import knn_scores, macro_auc, recall_at_k

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


def _render_fixed(cases: CaseSet, preprocess, preset: str, dpi: int, seed: int) -> np.ndarray:
    """Validation pages rendered once with fixed seeds: (n, H, W, 3) uint8."""
    from rag_ecg.paper.render import render_page

    return np.stack([preprocess.pixels(render_page(r, preset=preset, seed=render_seed(seed, VAL_STREAM, i), dpi=dpi),
                                       strict=False)
                     for i, r in enumerate(cases.records)])


def _autocast(dev: str, precision: str):
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _fit_epochs(first_epoch_s: float, max_minutes: float, start_epoch: int, end: int, d: Dist) -> int:
    """How many epochs (counting from 0) fit in the budget at the first epoch's pace; rank 0 decides."""
    fit = min(end, start_epoch + max(1, int(max_minutes * 60 // max(first_epoch_s, 1e-6))))
    if d.world > 1:
        import torch
        import torch.distributed as dist

        t = torch.tensor([fit], device="cuda" if torch.cuda.is_available() else "cpu")
        dist.broadcast(t, src=0)
        fit = int(t.item())
    return fit


def _barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _data_hash(train_keys: Sequence[str], val_keys: Sequence[str]) -> str:
    blob = json.dumps({"train": sorted(train_keys), "val": sorted(val_keys)}).encode()
    return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------------------------------------- resume
def _save_last(d: Path, encoder, opt, sched, epoch: int, step: int, cfg: EncoderTrainConfig, data_hash: str,
               planned_epochs: int | None = None) -> None:
    """Encoder checkpoint + optimizer/scheduler/RNG state after a whole epoch (tensors and plain data only)."""
    import torch

    encoder.save(d, training_data_hash=data_hash, training={"epoch": epoch, "step": step})
    state = {
        "epoch": epoch, "step": step, "resume_key": cfg.resume_key(), "data_hash": data_hash,
        "planned_epochs": planned_epochs,
        "weights_sha256": encoder.checkpoint_hash,
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": _py_rng_state(),
                "numpy": _np_rng_state()},
    }
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{STATE_FILE}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, d / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _resume_state(d: Path, cfg: EncoderTrainConfig) -> dict | None:
    """The saved training state of run_dir/last, if any; refuses one saved under another config (early,
    before any data is read)."""
    import torch

    if not cfg.resume or not (d / STATE_FILE).is_file():
        return None
    state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)  # tensors + plain data only
    if state.get("resume_key") != cfg.resume_key():
        raise ValueError(f"{d}: the saved run used another config (model, data or optimisation settings "
                         f"differ); use a new run_dir or resume=false")
    return state


def _restore(d: Path, state: dict | None, encoder, opt, sched, dev: str, say) -> tuple[int, int]:
    """Restore weights, optimizer, scheduler and RNG from run_dir/last; (start_epoch, step) or (0, 0)."""
    import torch

    from rag_ecg.encoder.model import ECGEncoder, EncoderLoadError

    if state is None:
        return 0, 0
    try:
        saved = ECGEncoder.load(d, device=dev, expected_hash=state.get("weights_sha256"))
    except EncoderLoadError as exc:
        raise ValueError(f"{d}: cannot resume ({exc})") from None
    encoder.model.load_state_dict(saved.model.state_dict())
    if encoder.aux_head is not None and saved.aux_head is not None:
        encoder.aux_head.load_state_dict(saved.aux_head.state_dict())
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    _set_py_rng_state(state["rng"]["python"])
    _set_np_rng_state(state["rng"]["numpy"])
    encoder.mark_modified()
    say(f"resumed from {d}: epoch {state['epoch']}, step {state['step']}")
    return int(state["epoch"]), int(state["step"])


def _py_rng_state() -> list:
    v, inner, gauss = random.getstate()
    return [v, list(inner), gauss]


def _set_py_rng_state(s: list) -> None:
    random.setstate((s[0], tuple(s[1]), s[2]))


def _np_rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
            "cached": float(cached)}


def _set_np_rng_state(s: dict) -> None:
    np.random.set_state((s["name"], np.array(s["keys"], dtype=np.uint32), s["pos"], s["has_gauss"], s["cached"]))


# ---------------------------------------------------------------------------------------------- output
class _Log:
    """metrics.jsonl: one JSON object a line, appended and flushed (rank 0 only)."""

    def __init__(self, path: Path, active: bool):
        self.path, self.active = path, active
        if active:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, obj: dict) -> None:
        if self.active:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **obj}, default=_jsonable) + "\n")


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


class _Progress:
    """A rich progress bar when enabled, silent otherwise."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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


def _save_config(cfg: EncoderTrainConfig, path: Path) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    os.replace(tmp, path)


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
    with `summarize(result)`; `rag_ecg.eval.metrics.flat_metrics(result)` flattens it for JSON.
    """
    from rag_ecg.encoder.model import ECGEncoder
    from rag_ecg.eval.metrics import evaluate_encoder

    encoder = ECGEncoder.load(checkpoint, device=device)
    if dpi is None:
        dpi = int(encoder.manifest.get("training", {}).get("config", {}).get("dpi") or 100)
    cfg = EncoderTrainConfig(db=db, train_folds=list(train_folds), val_folds=list(val_folds))
    lib, descriptions = load_cases(cfg, cfg.train_folds, limit_library, store=store)
    val, _ = load_cases(cfg, cfg.val_folds, limit_queries, descriptions, store=store)
    return evaluate_encoder(encoder, lib.records, val.records, list(presets), k=k, temperature=temperature,
                            descriptions=descriptions, dpi=dpi, workers=workers,
                            progress=lambda m: print(m, file=sys.stderr, flush=True))


def _cli(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description="Contrastive training of the rag-ecg image/report encoder.")
    ap.add_argument("--config", required=True, help="YAML config (training/configs/encoder_*.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (values parsed as YAML)")
    a = ap.parse_args(argv)
    return main(a.config, list(a.overrides))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(_cli(sys.argv[1:]))
