"""LoRA / QLoRA fine-tune of a LLaVA-NeXT model (PULSE-7B in HF layout, or the tiny test model).

Why a small hand-written loop and not HF Trainer: the loss must cover answer tokens only (prompt and image
tokens are -100), resume must be exact (adapter + optimizer + scheduler + step + RNG, so a killed 7B run
continues bit-for-bit on the same data order), and the same code has to run on a 2-core CPU in tests and
under `torchrun`/`accelerate launch` (DDP from the usual env vars) on GPUs.

Data: JSONL in the LLaVA conversation format, one sample a line:
    {"id": ..., "image": "images/123.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                           {"from": "gpt", "value": "..."}, ...]}
Image paths are relative to the JSONL's folder (or `image_root`).

Run layout under `out_dir`:
    checkpoints/step-000100/   adapter + optimizer/scheduler state + RNG (the newest is resumed)
    adapter/                   final LoRA adapter (peft) + processor: `PeftModel.from_pretrained(base, ...)`
    merged/                    optional: base with the adapter merged, HF format + processor (vLLM-servable)
    metrics.jsonl              one line per logged step / evaluation
    manifest.json              config, versions, data sizes, skipped samples
    finetune_config.yaml       the resolved config

    python training/finetune_llm.py --config training/configs/lora_tiny_cpu.yaml [key=value ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script (`torchrun training/finetune_llm.py`): the checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.nn.parallel import DistributedDataParallel

from rag_ecg.io import atomic_dir, versions, write_json
from rag_ecg.redact import redact
from training.common import (Dist, MetricsLog, all_reduce_sum, barrier, save_config, setup_distributed,
                             thread_guard)
from training.finetune_config import FinetuneConfig, load_config, torch_dtype
from training.llm_checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from training.llm_data import (IGNORE_INDEX, ConversationDataset, StrictView, epoch_batches, make_loader,
                               steps_per_epoch)
from training.llm_model import (build_peft_model, load_base_model, load_processor, merge_adapter,
                                token_loss_sum, to_device)

log = logging.getLogger(__name__)


@dataclass
class FinetuneRun:
    """What one fine-tune carries from `setup` through `train_epoch` to `finalize`."""

    cfg: FinetuneConfig
    dist: Dist
    run: Path  # out_dir
    processor: Any
    pad_id: int
    train_ds: ConversationDataset
    val_ds: ConversationDataset | None
    model: Any  # the peft model
    ddp_model: Any  # `model`, wrapped in DDP under torchrun
    params: list  # the trainable parameters (what is clipped)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    spe: int  # optimizer steps per epoch
    total: int  # optimizer steps of the whole run
    n_trainable: int
    metrics: MetricsLog
    step: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # sample id -> why it could not be used
    t0: float = 0.0
    window_loss: float = 0.0  # answer-token loss summed since the last metrics line
    window_tok: float = 0.0


# ---------------------------------------------------------------------------------------------- recipe
def train(cfg: FinetuneConfig) -> Path:
    """Run (or resume) the fine-tune described by `cfg`; returns the run folder (`cfg.out_dir`)."""
    # tiny matmuls on busy shared cores: 1 thread avoids OpenMP spin-waits (~100x)
    with thread_guard(cfg.cpu_threads):
        r = setup(cfg)
        while r.step < r.total:
            train_epoch(r, r.step // r.spe)
        return finalize(r)


def setup(cfg: FinetuneConfig) -> FinetuneRun:
    """Process group, seeds, processor and data, LoRA model, optimizer and schedule, resumed from the newest
    checkpoint when there is one."""
    from transformers import get_scheduler

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    dist = setup_distributed(cfg.device)
    run = Path(cfg.out_dir)
    random.seed(cfg.seed + dist.rank)
    torch.manual_seed(cfg.seed)  # identical adapter init on every rank

    processor = load_processor(cfg)
    train_ds = ConversationDataset(cfg.train_jsonl, processor, cfg.max_length, cfg.image_root)
    val_ds = ConversationDataset(cfg.val_jsonl, processor, cfg.max_length, cfg.image_root) if cfg.val_jsonl else None

    model = build_peft_model(cfg, load_base_model(cfg, dist))
    if cfg.quantization == "none":
        model.to(dist.device)
    model.train()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    if dist.main:
        log.info(f"model {cfg.model_path}: {n_all / 1e6:.2f} M params, {n_train / 1e6:.3f} M trainable "
                 f"({100 * n_train / n_all:.2f} %); {len(train_ds)} train samples; world {dist.world}")

    proj = [p for n, p in model.named_parameters() if p.requires_grad and "multi_modal_projector" in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "multi_modal_projector" not in n]
    groups = [{"params": rest, "lr": cfg.learning_rate}]
    if proj:
        groups.append({"params": proj, "lr": cfg.projector_lr or cfg.learning_rate})
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=cfg.adam_betas,
                                  weight_decay=cfg.weight_decay)
    spe = steps_per_epoch(len(train_ds), cfg, dist.world)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_epochs * spe))
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total),
                              num_training_steps=total)

    step, skipped = 0, {}
    ck = latest_checkpoint(run) if cfg.resume else None
    if ck is not None:
        state = load_checkpoint(ck, model, optimizer, scheduler, cfg, dist)
        step, skipped = int(state["step"]), dict(state.get("skipped", {}))
        if dist.main:
            log.info(f"resumed from {ck} at step {step}/{total}")
    if dist.main:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "finetune_config.yaml")

    ddp_model = model
    if dist.world > 1:
        ddp_model = DistributedDataParallel(
            model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None,
            find_unused_parameters=cfg.ddp_find_unused_parameters)
    return FinetuneRun(cfg=cfg, dist=dist, run=run, processor=processor, pad_id=processor.tokenizer.pad_token_id,
                       train_ds=train_ds, val_ds=val_ds, model=model, ddp_model=ddp_model,
                       params=[p for g in groups for p in g["params"]], optimizer=optimizer, scheduler=scheduler,
                       spe=spe, total=total, n_trainable=n_train,
                       metrics=MetricsLog(run / "metrics.jsonl", dist.main), step=step, skipped=skipped,
                       t0=time.time())


def train_epoch(r: FinetuneRun, epoch: int) -> None:
    """The optimizer steps of `epoch` still to do (all of them, or the rest after a resume mid-epoch), with
    metrics lines, periodic validation and resumable checkpoints; stops at the run's last step."""
    cfg, dist = r.cfg, r.dist
    offset = r.step - epoch * r.spe
    batches = epoch_batches(len(r.train_ds), cfg, dist, epoch)[: r.spe * cfg.grad_accum]
    it = iter(make_loader(r.train_ds, batches[offset * cfg.grad_accum:], cfg, r.pad_id))
    for _ in range(r.spe - offset):
        ntok = _optimizer_step(r, [next(it) for _ in range(cfg.grad_accum)])
        step, total = r.step, r.total
        if dist.main and (step % max(1, cfg.log_every) == 0 or step == total or step == 1):
            rec = {"step": step, "epoch": round(step / r.spe, 4), "loss": r.window_loss / max(r.window_tok, 1),
                   "lr": r.scheduler.get_last_lr()[0], "answer_tokens": ntok,
                   "elapsed_s": round(time.time() - r.t0, 3)}
            r.metrics.write(rec)
            log.info(f"step {step}/{total} loss {rec['loss']:.4f} lr {rec['lr']:.2e}")
            r.window_loss, r.window_tok = 0.0, 0
        if r.val_ds is not None and cfg.eval_every > 0 and step % cfg.eval_every == 0 and step < total:
            _log_eval(r)
        if cfg.save_every > 0 and step % cfg.save_every == 0 and step < total:
            save_checkpoint(r.run, step, r.model, r.optimizer, r.scheduler, cfg, dist, {"skipped": r.skipped})
        if step >= total:
            break


def _optimizer_step(r: FinetuneRun, micro: list[dict]) -> float:
    """One optimizer step over `grad_accum` micro-batches, the loss a mean over every rank's answer tokens;
    returns that token count."""
    dist = r.dist
    for mb in micro:
        for sid, why in mb.get("skipped", []):
            if sid not in r.skipped and dist.main:
                log.warning(f"skipping sample {sid}: {why}")
            r.skipped[sid] = why
    ntok = torch.tensor(sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in micro
                            if "labels" in mb), device=dist.device, dtype=torch.float64)
    ntok = float(all_reduce_sum(ntok, dist))
    dtype = torch_dtype(r.cfg.dtype)
    step_loss = 0.0
    for j, mb in enumerate(micro):
        if "input_ids" not in mb:
            continue
        sync = j == len(micro) - 1 or dist.world == 1
        ctx = r.ddp_model.no_sync() if (dist.world > 1 and not sync) else nullcontext()
        with ctx:
            loss_sum, _ = token_loss_sum(r.ddp_model, to_device(mb, dist.device, dtype))
            # DDP averages gradients over ranks, hence * world: the result is the global token mean
            (loss_sum * dist.world / max(ntok, 1.0)).backward()
        step_loss += float(loss_sum.detach())
    if r.cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(r.params, r.cfg.max_grad_norm)
    r.optimizer.step()
    r.scheduler.step()
    r.optimizer.zero_grad(set_to_none=True)
    r.step += 1
    r.window_loss += float(all_reduce_sum(torch.tensor(step_loss, dtype=torch.float64, device=dist.device), dist))
    r.window_tok += ntok
    return ntok


def finalize(r: FinetuneRun) -> Path:
    """Final validation and checkpoint; on rank 0 the adapter (+ processor), the merged model if asked, and
    the manifest."""
    cfg, dist, run = r.cfg, r.dist, r.run
    if r.val_ds is not None:
        _log_eval(r)
    save_checkpoint(run, r.step, r.model, r.optimizer, r.scheduler, cfg, dist, {"skipped": r.skipped})
    if dist.main:
        with atomic_dir(run / "adapter") as tmp:
            r.model.save_pretrained(tmp)
            r.processor.save_pretrained(tmp)
        log.info(f"adapter -> {run / 'adapter'}")
        if cfg.merge:
            merge_adapter(cfg.model_path, run / "adapter", run / "merged", cfg.merge_dtype,
                          processor_path=cfg.processor_path, image_grid_pinpoints=cfg.image_grid_pinpoints)
            log.info(f"merged checkpoint -> {run / 'merged'}")
        write_json(run / "manifest.json", {
            "config": redact(dataclasses.asdict(cfg)), "steps": r.step, "total_steps": r.total,
            "train_samples": len(r.train_ds), "val_samples": len(r.val_ds) if r.val_ds is not None else 0,
            "trainable_params": r.n_trainable, "skipped_samples": r.skipped, "versions": versions()})
    barrier(dist)
    return run


def _log_eval(r: FinetuneRun) -> None:
    val = evaluate(r.model, r.val_ds, r.cfg, r.dist, r.pad_id)
    if r.dist.main:
        r.metrics.write({"step": r.step, "val_loss": val})
        log.info(f"step {r.step} val_loss {val:.4f}")


def evaluate(model, dataset, cfg: FinetuneConfig, dist: Dist, pad_id: int) -> float:
    """Mean answer-token loss over (up to eval_max_samples of) the validation set, across ranks."""
    n = min(len(dataset), cfg.eval_max_samples)
    idx = list(range(dist.rank, n, dist.world))
    b = cfg.per_device_batch_size
    was_training = model.training
    model.eval()
    tot = torch.zeros(2, dtype=torch.float64, device=dist.device)
    with torch.no_grad():
        for batch in make_loader(StrictView(dataset), [idx[i:i + b] for i in range(0, len(idx), b)], cfg, pad_id):
            if "input_ids" not in batch:
                continue
            loss, ntok = token_loss_sum(model, to_device(batch, dist.device, torch_dtype(cfg.dtype)))
            tot += torch.tensor([float(loss), ntok], dtype=torch.float64, device=dist.device)
    all_reduce_sum(tot, dist)
    model.train(was_training)
    return float(tot[0] / tot[1]) if tot[1] > 0 else float("nan")


# ---------------------------------------------------------------------------------------------- entry points
def main(config_path: str | Path | None, overrides: dict | list[str] | None = None) -> Path:
    """Entry point for `cli.py finetune`: load config (+ overrides such as model_path) and train."""
    return train(load_config(config_path, overrides))


def _cli(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description="LoRA fine-tune of a LLaVA-NeXT model (PULSE-7B) on ECG chats.")
    ap.add_argument("--config", required=True, help="YAML config (training/configs/*.yaml)")
    ap.add_argument("--model-path", help="local HF-format LLaVA-NeXT folder (overrides model_path)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    a = ap.parse_args(argv)
    ov = list(a.overrides) + ([f"model_path={a.model_path}"] if a.model_path else [])
    return main(a.config, ov)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(_cli(sys.argv[1:]))
