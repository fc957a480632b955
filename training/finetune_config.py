"""The LoRA fine-tune's config: every field of one run (a comment each), loaded from YAML + overrides,
checked before any model is read, and saved beside the run as finetune_config.yaml."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rag_ecg.config import load_config as _load_config
from rag_ecg.errors import ConfigError

LANGUAGE_MODEL_ATTENTION = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass
class FinetuneConfig:
    """Everything one fine-tune run needs; saved beside its outputs as finetune_config.yaml."""

    model_path: str = ""  # local HF-format LLaVA-NeXT folder (PULSE-7B converted, or the tiny test model)
    processor_path: str | None = None  # processor folder if not inside model_path
    train_jsonl: str = ""  # training conversations (LLaVA format JSONL)
    val_jsonl: str | None = None  # validation conversations; None skips evaluation
    image_root: str | None = None  # base for relative image paths; None = each JSONL's own folder
    out_dir: str = "runs/finetune"  # run folder (checkpoints, adapter, merged, metrics)

    # LoRA
    lora_r: int = 64  # adapter rank
    lora_alpha: int = 128  # scaling numerator (effective scale alpha / r)
    lora_dropout: float = 0.05  # dropout on the adapter input
    target_modules: str = LANGUAGE_MODEL_ATTENTION  # regex over module names: language model only
    train_projector: bool = True  # also train the vision->text projector (fully, as a saved module)
    projector_lr: float | None = None  # projector learning rate; None = `learning_rate`
    quantization: str = "none"  # none | 4bit (QLoRA, NF4) | 8bit; needs CUDA + bitsandbytes

    # precision / memory
    dtype: str = "bf16"  # bf16 | fp16 | fp32: weights and compute
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    gradient_checkpointing: bool = True  # recompute activations in backward (memory for ~33% more compute)
    max_length: int = 4096  # tokens per sample incl. image tokens; longer text is cut at the end
    image_grid_pinpoints: list[list[int]] | None = None  # override model+processor any-res grids; None keeps

    # optimisation
    per_device_batch_size: int = 4  # samples per micro-batch per GPU
    grad_accum: int = 32  # micro-batches per optimizer step (global batch = this x batch x GPUs)
    learning_rate: float = 2e-4  # peak LR for adapter weights
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    lr_scheduler: str = "cosine"  # transformers.get_scheduler name: cosine | linear | constant_with_warmup
    warmup_ratio: float = 0.03  # share of total steps spent warming up
    num_epochs: float = 3.0  # passes over the training data (used when max_steps <= 0)
    max_steps: int = 0  # total optimizer steps; > 0 overrides num_epochs
    seed: int = 0  # data order, adapter init, dropout

    # bookkeeping
    log_every: int = 10  # optimizer steps between metrics lines
    eval_every: int = 0  # optimizer steps between validation passes; 0 = only at the end
    eval_max_samples: int = 512  # cap on validation samples per pass
    save_every: int = 500  # optimizer steps between resumable checkpoints; 0 = only at the end
    save_total_limit: int = 2  # resumable checkpoints kept (oldest deleted)
    resume: bool = True  # continue from the newest checkpoint in out_dir/checkpoints when present
    merge: bool = False  # also write out_dir/merged (base + adapter merged, HF format)
    merge_dtype: str = "bf16"  # dtype of the merged checkpoint
    num_workers: int = 2  # DataLoader worker processes (0 = load in the training process)
    device: str = "auto"  # auto | cpu | cuda
    ddp_find_unused_parameters: bool = False  # DDP: True if some samples have no image (projector unused)
    cpu_threads: int = 0  # torch intra-op threads while training on CPU; 0 = torch's default (tiny: 1)

    def __post_init__(self):
        self.adam_betas = tuple(self.adam_betas)  # YAML gives lists


def load_config(config_path: str | Path | None, overrides: dict | list[str] | None = None) -> FinetuneConfig:
    """YAML -> FinetuneConfig; overrides: `key=value` strings (values parsed as YAML, `null` = None) or a
    dict whose None values mean "keep the file's value"; then the paths and choices are checked."""
    cfg = _load_config(FinetuneConfig, config_path, overrides)
    _validate(cfg)
    return cfg


def _validate(cfg: FinetuneConfig) -> None:
    if not cfg.model_path:
        raise ConfigError("model_path: not set (give the local HF-format LLaVA-NeXT folder, e.g. --model-path)")
    if not Path(cfg.model_path).is_dir():
        raise FileNotFoundError(f"{cfg.model_path}: model folder not found (convert PULSE-7B to HF format first)")
    if not cfg.train_jsonl or not Path(cfg.train_jsonl).is_file():
        raise FileNotFoundError(f"{cfg.train_jsonl or 'train_jsonl'}: training JSONL not found")
    if cfg.val_jsonl and not Path(cfg.val_jsonl).is_file():
        raise FileNotFoundError(f"{cfg.val_jsonl}: validation JSONL not found")
    if cfg.quantization not in ("none", "4bit", "8bit"):
        raise ConfigError(f"quantization: {cfg.quantization!r} is not one of none, 4bit, 8bit")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype: {cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    if cfg.per_device_batch_size < 1 or cfg.grad_accum < 1:
        raise ConfigError("per_device_batch_size and grad_accum must be >= 1")
    if cfg.max_length < 16:
        raise ConfigError(f"max_length: {cfg.max_length} is too small")


def torch_dtype(name: str) -> torch.dtype:
    """bf16 | fp16 | fp32 -> the torch dtype."""
    return getattr(torch, DTYPES[name])
