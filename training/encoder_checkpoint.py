"""Resumable state of an encoder run (run_dir/last): the encoder checkpoint plus optimizer, scheduler, epoch,
step and RNG after each whole epoch, refused when the saved run used another optimisation config.

`last/` is replaced whole (`rag_ecg.io.atomic_dir`): a run killed while saving resumes from the previous
epoch's complete `last/`, never from a half-written one. `RAG_ECG_KILL_AT=encoder-last` SIGKILLs the process
inside the save, after the new weights are written and before they are published (the durability test).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from rag_ecg.encoder.checkpoint import EncoderLoadError
from rag_ecg.encoder.model import ECGEncoder
from rag_ecg.errors import ArtifactError, ConfigError
from rag_ecg.io import atomic_dir, atomic_write_with, recover_dir
from training.common import kill_point, rng_state, set_rng_state
from training.encoder_config import EncoderTrainConfig

STATE_FILE = "train_state.pt"


def save_last(d: Path, encoder, opt, sched, epoch: int, step: int, cfg: EncoderTrainConfig, data_hash: str,
              planned_epochs: int | None = None) -> None:
    """Encoder checkpoint + optimizer/scheduler/RNG state after a whole epoch (tensors and plain data only),
    written into a fresh folder that replaces `d` only once complete."""
    with atomic_dir(d) as tmp:
        encoder.save(tmp, training_data_hash=data_hash, training={"epoch": epoch, "step": step})
        kill_point("encoder-last")
        state = {
            "epoch": epoch, "step": step, "resume_key": cfg.resume_key(), "data_hash": data_hash,
            "planned_epochs": planned_epochs,
            "weights_sha256": encoder.checkpoint_hash,
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": rng_state(),
        }
        atomic_write_with(tmp / STATE_FILE, lambda t: torch.save(state, t))
    for stale in d.parent.glob(f".{d.name}.*"):  # temp folders of saves killed before they were published
        shutil.rmtree(stale, ignore_errors=True)


def resume_state(d: Path, cfg: EncoderTrainConfig) -> dict | None:
    """The saved training state of run_dir/last, if any; refuses one saved under another config (early,
    before any data is read)."""
    if not cfg.resume:
        return None
    recover_dir(d)  # a kill between the two renames of the last save left `d` moved aside: put it back
    if not (d / STATE_FILE).is_file():
        return None
    state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)  # tensors + plain data only
    if state.get("resume_key") != cfg.resume_key():
        raise ConfigError(f"{d}: the saved run used another config (model, data or optimisation settings "
                          f"differ); use a new run_dir or resume=false")
    return state


def restore(d: Path, state: dict | None, encoder, opt, sched, dev: str) -> tuple[int, int]:
    """Restore weights, optimizer, scheduler and RNG from run_dir/last; (start_epoch, step) or (0, 0)."""
    if state is None:
        return 0, 0
    try:
        saved = ECGEncoder.load(d, device=dev, expected_hash=state.get("weights_sha256"))
    except EncoderLoadError as exc:
        raise ArtifactError(f"{d}: cannot resume ({exc})") from None
    encoder.model.load_state_dict(saved.model.state_dict())
    if encoder.aux_head is not None and saved.aux_head is not None:
        encoder.aux_head.load_state_dict(saved.aux_head.state_dict())
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    encoder.mark_modified()
    return int(state["epoch"]), int(state["step"])
