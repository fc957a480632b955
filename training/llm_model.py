"""The fine-tune's model side: the LLaVA-NeXT processor and base (optionally 4/8-bit), LoRA on the language
model, the answer-token loss, and merging a trained adapter into a servable HF checkpoint."""
from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rag_ecg.errors import BackendError, ConfigError
from rag_ecg.io import atomic_dir
from training.common import Dist
from training.finetune_config import FinetuneConfig, torch_dtype
from training.llm_data import IGNORE_INDEX


def load_processor(cfg: FinetuneConfig):
    from transformers import LlavaNextProcessor

    proc = LlavaNextProcessor.from_pretrained(cfg.processor_path or cfg.model_path)
    if cfg.image_grid_pinpoints:
        proc.image_processor.image_grid_pinpoints = [list(p) for p in cfg.image_grid_pinpoints]
    if proc.tokenizer.pad_token_id is None:
        proc.tokenizer.pad_token = proc.tokenizer.unk_token or proc.tokenizer.eos_token
    return proc


def _quantization_config(cfg: FinetuneConfig, device: torch.device):
    """bitsandbytes config for QLoRA; a clear error when the run's device is no GPU or the package is missing
    (the run's device, not the host: `device: cpu` on a GPU host would quantize for a GPU it never uses)."""
    if device.type != "cuda":
        raise BackendError(f"quantization={cfg.quantization}: needs a CUDA GPU (bitsandbytes), the run's device "
                           f"is {device}; use quantization: none on CPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BackendError(f"quantization={cfg.quantization}: bitsandbytes is not installed "
                           "(pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    skip = ["vision_tower", "multi_modal_projector", "lm_head"]  # only the language model is quantized
    if cfg.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch_dtype(cfg.dtype), llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def load_base_model(cfg: FinetuneConfig, dist: Dist):
    """The LLaVA-NeXT base in `dtype` (or 4/8-bit), vision tower frozen, ready for peft."""
    from transformers import LlavaNextForConditionalGeneration

    kwargs: dict = {"dtype": torch_dtype(cfg.dtype), "attn_implementation": cfg.attn_implementation}
    if cfg.quantization != "none":
        kwargs["quantization_config"] = _quantization_config(cfg, dist.device)
    if dist.device.type == "cuda":  # straight onto this rank's GPU: N ranks never hold N CPU copies
        kwargs["device_map"] = {"": dist.device.index or 0}
    model = LlavaNextForConditionalGeneration.from_pretrained(cfg.model_path, **kwargs)
    if cfg.image_grid_pinpoints:
        model.config.image_grid_pinpoints = [list(p) for p in cfg.image_grid_pinpoints]
    model.config.use_cache = False
    for p in model.model.vision_tower.parameters():  # frozen as in PULSE / LLaVA fine-tuning
        p.requires_grad_(False)
    if cfg.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@contextmanager
def quiet_peft() -> Iterator[None]:
    """peft 0.21 probes `is_gradient_checkpointing`, which transformers 5.2x deprecated: not our warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def build_peft_model(cfg: FinetuneConfig, base):
    """Wrap the base with LoRA on the language model's attention (+ the projector as a saved module)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, bias="none",
                      modules_to_save=["multi_modal_projector"] if cfg.train_projector else None)
    with quiet_peft():
        model = get_peft_model(base, lora)
    leaked = [n for n, p in model.named_parameters() if p.requires_grad and "vision_tower" in n]
    if leaked:
        raise ConfigError(f"target_modules {cfg.target_modules!r} reach the vision tower ({leaked[0]}); "
                          "restrict it to the language model")
    if not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n):
        raise ConfigError(f"target_modules {cfg.target_modules!r} matched no module of {cfg.model_path}")
    if cfg.gradient_checkpointing and cfg.quantization == "none":
        base_model, kw = model.get_base_model(), {"use_reentrant": False}
        if hasattr(base_model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    return model


def unwrap(model):
    """The peft model inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") and not hasattr(model, "peft_config") else model


def token_loss_sum(model, batch: dict) -> tuple[Any, int]:
    """Sum of next-token cross-entropy over answer tokens (fp32) and how many tokens that was."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}
    logits = model(**inputs, use_cache=False).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:].to(shift_logits.device)
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((shift_labels != IGNORE_INDEX).sum())


def to_device(batch: dict, device, dtype) -> dict:
    """A collated batch on `device`, pixel values in the compute dtype (the `skipped` list stays behind)."""
    out = {}
    for k, v in batch.items():
        if k == "skipped":
            continue
        v = v.to(device)
        out[k] = v.to(dtype) if k == "pixel_values" else v
    return out


def merge_adapter(base_path: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "bf16",
                  processor_path: str | Path | None = None,
                  image_grid_pinpoints: list[list[int]] | None = None) -> Path:
    """Base (reloaded unquantized in `dtype`) + adapter -> merged HF checkpoint + processor, written atomically.

    The result loads with `LlavaNextForConditionalGeneration.from_pretrained` and is what vLLM serves
    (vLLM's LLaVA-NeXT does not take LoRA adapters at serve time; see the module's report).
    """
    from peft import PeftModel
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    base = LlavaNextForConditionalGeneration.from_pretrained(str(base_path), dtype=torch_dtype(dtype))
    if image_grid_pinpoints:
        base.config.image_grid_pinpoints = [list(p) for p in image_grid_pinpoints]
    with quiet_peft():
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    src = Path(adapter_dir) if (Path(adapter_dir) / "processor_config.json").exists() else \
        Path(processor_path or base_path)
    processor = LlavaNextProcessor.from_pretrained(str(src))
    with atomic_dir(Path(out_dir)) as tmp:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out_dir)
