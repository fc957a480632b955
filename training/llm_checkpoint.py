"""Resumable fine-tune checkpoints (out_dir/checkpoints/step-N): adapter, optimizer, scheduler and every
rank's RNG, so a killed run continues bit-for-bit; refused when made with another model, data or LoRA.
`RAG_ECG_KILL_AT=llm-checkpoint` SIGKILLs the run once its first checkpoint is published (the resume test).

Every file loads as plain data (`weights_only=True`: a crafted pickle is refused in one line, never run), and
older checkpoints are deleted only after the new one is published and every file of it loads back."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from rag_ecg.errors import ArtifactError, ConfigError
from rag_ecg.io import atomic_dir, read_json, write_json
from training.common import Dist, gather_objects, kill_point, rng_state, set_rng_state
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
    verify_checkpoint(ck, dist.world)  # raises before anything older is touched
    kept = sorted((run / "checkpoints").glob("step-*"))
    older = [p for p in kept if p.name < ck.name]
    for old in older[: max(0, len(older) + 1 - max(1, cfg.save_total_limit))]:
        shutil.rmtree(old, ignore_errors=True)
    kill_point("llm-checkpoint")
    return ck


def verify_checkpoint(ck: Path, world: int) -> None:
    """Load every file of a checkpoint back (on the CPU); ArtifactError naming the first that does not load."""
    try:
        read_json(ck / "trainer_state.json")
        load_file(str(ck / "adapter_model.safetensors"), device="cpu")
    except Exception as exc:
        raise ArtifactError(f"{ck}: checkpoint does not load back ({_first_line(exc)})") from None
    _load_plain(ck / "training_state.pt", "cpu")
    for r in range(world):
        _load_plain(ck / f"rng-rank{r}.pt", "cpu")


def _load_plain(path: Path, device):
    """Tensors and plain data only: anything else (a pickle that would run code) is refused in one line."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ArtifactError(f"{path}: refused, not a plain-data checkpoint file ({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


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
    ts = _load_plain(ck / "training_state.pt", dist.device)
    rng = ck / f"rng-rank{dist.rank}.pt"
    rng_saved = _load_plain(rng, "cpu") if rng.is_file() else None  # plain data + uint8 tensors only
    optimizer.load_state_dict(ts["optimizer"])
    scheduler.load_state_dict(ts["scheduler"])
    if rng_saved is not None:
        set_rng_state(rng_saved)
    return state
