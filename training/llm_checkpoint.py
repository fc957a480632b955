"""Resumable fine-tune checkpoints (out_dir/checkpoints/step-N): adapter, optimizer, scheduler and every
rank's RNG, so a killed run continues bit-for-bit; refused when made with another model, data or LoRA."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from rag_ecg.errors import ConfigError
from rag_ecg.io import atomic_dir, read_json, write_json
from training.common import Dist, gather_objects, rng_state, set_rng_state
from training.finetune_config import FinetuneConfig
from training.llm_model import unwrap

# what a resumed run must share with the checkpoint it continues
_RESUME_KEYS = ("model_path", "lora_r", "lora_alpha", "target_modules", "train_projector", "seed",
                "per_device_batch_size", "grad_accum", "train_jsonl", "max_length", "quantization")


def save_checkpoint(run: Path, step: int, model, optimizer, scheduler, cfg: FinetuneConfig, dist: Dist,
                    extra: dict) -> Path | None:
    """Adapter + optimizer + scheduler + every rank's RNG for an exact resume; oldest beyond the limit go."""
    rngs = gather_objects(rng_state(), dist)
    if not dist.main:
        return None
    ck = run / "checkpoints" / f"step-{step:06d}"
    with atomic_dir(ck) as tmp:
        unwrap(model).save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp / "training_state.pt")
        for r, st in enumerate(rngs):
            torch.save(st, tmp / f"rng-rank{r}.pt")
        write_json(tmp / "trainer_state.json", {"step": step, "world": dist.world,
                                                "config": dataclasses.asdict(cfg), **extra})
    kept = sorted((run / "checkpoints").glob("step-*"))
    for old in kept[: max(0, len(kept) - max(1, cfg.save_total_limit))]:
        shutil.rmtree(old, ignore_errors=True)
    return ck


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint of the run, if any."""
    cks = sorted(p for p in (run / "checkpoints").glob("step-*") if (p / "trainer_state.json").is_file())
    return cks[-1] if cks else None


def load_checkpoint(ck: Path, model, optimizer, scheduler, cfg: FinetuneConfig, dist: Dist) -> dict:
    """Restore what save_checkpoint wrote; refuses a checkpoint made with a different model/data/LoRA."""
    from peft import set_peft_model_state_dict

    state = read_json(ck / "trainer_state.json")
    old = state.get("config", {})
    diff = [k for k in _RESUME_KEYS if str(old.get(k)) != str(getattr(cfg, k))]
    if int(state.get("world", 1)) != dist.world:
        diff.append(f"world size ({state.get('world')} processes, now {dist.world})")
    if diff:
        raise ConfigError(f"{ck}: made with different {', '.join(diff)}; use a new out_dir or resume: false")
    weights = load_file(str(ck / "adapter_model.safetensors"), device=str(dist.device))
    set_peft_model_state_dict(unwrap(model), weights)
    ts = torch.load(ck / "training_state.pt", map_location=dist.device, weights_only=True)
    optimizer.load_state_dict(ts["optimizer"])
    scheduler.load_state_dict(ts["scheduler"])
    rng = ck / f"rng-rank{dist.rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))  # plain data + uint8 tensors only
    return state
