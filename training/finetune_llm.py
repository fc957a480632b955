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
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

IGNORE_INDEX = -100
LANGUAGE_MODEL_ATTENTION = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# ----------------------------------------------------------------------------------------------------- config
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
    dict whose None values mean "keep the file's value"."""
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
        data.update(parsed)  # `key=null` sets None
    else:  # a dict from typed CLI options: None means "not given"
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = config_path or "overrides"
        raise ValueError(f"{where}: unknown config field(s) {', '.join(unknown)}")
    cfg = FinetuneConfig(**data)
    _validate(cfg)
    return cfg


def _validate(cfg: FinetuneConfig) -> None:
    if not cfg.model_path:
        raise ValueError("model_path: not set (give the local HF-format LLaVA-NeXT folder, e.g. --model-path)")
    if not Path(cfg.model_path).is_dir():
        raise FileNotFoundError(f"{cfg.model_path}: model folder not found (convert PULSE-7B to HF format first)")
    if not cfg.train_jsonl or not Path(cfg.train_jsonl).is_file():
        raise FileNotFoundError(f"{cfg.train_jsonl or 'train_jsonl'}: training JSONL not found")
    if cfg.val_jsonl and not Path(cfg.val_jsonl).is_file():
        raise FileNotFoundError(f"{cfg.val_jsonl}: validation JSONL not found")
    if cfg.quantization not in ("none", "4bit", "8bit"):
        raise ValueError(f"quantization: {cfg.quantization!r} is not one of none, 4bit, 8bit")
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"dtype: {cfg.dtype!r} is not one of {', '.join(_DTYPES)}")
    if cfg.per_device_batch_size < 1 or cfg.grad_accum < 1:
        raise ValueError("per_device_batch_size and grad_accum must be >= 1")
    if cfg.max_length < 16:
        raise ValueError(f"max_length: {cfg.max_length} is too small")


_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _torch_dtype(name: str):
    import torch

    return getattr(torch, _DTYPES[name])


# ------------------------------------------------------------------------------------------------------- data
def conversation_to_messages(sample: dict) -> list[dict]:
    """LLaVA `conversations` -> chat messages with content parts; the `<image>` tag becomes an image part."""
    conv = sample.get("conversations")
    sid = sample.get("id", "?")
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"sample {sid}: 'conversations' missing or empty")
    messages, n_images = [], 0
    for turn in conv:
        role = _ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise ValueError(f"sample {sid}: unknown speaker {turn.get('from')!r} (human/gpt/system expected)")
        value = str(turn.get("value", ""))
        parts: list[dict] = []
        if "<image>" in value:
            n_images += value.count("<image>")
            value = value.replace("<image>", "").strip()
            parts.append({"type": "image"})
        parts.append({"type": "text", "text": value})
        messages.append({"role": role, "content": parts})
    if n_images > 1:
        raise ValueError(f"sample {sid}: {n_images} <image> tags; one image per sample is supported")
    if n_images and not sample.get("image"):
        raise ValueError(f"sample {sid}: has an <image> tag but no 'image' path")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"sample {sid}: no gpt/assistant turn to learn from")
    return messages


def chat_segments(processor, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split the chat-template rendering into (text, is_answer) pieces, for any prefix-stable template.

    Each assistant turn is the text added between rendering the history with a generation prompt and
    rendering it with the answer: exactly what the model must produce (its end-of-turn token included).
    """
    def render(msgs, gen):
        return processor.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)

    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("conversation starts with an assistant turn")
        prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("chat template is not prefix-stable; cannot locate the answer tokens")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return segments


@dataclass
class Example:
    """One tokenized sample: 1-D input_ids/labels (tokens), pixel_values (patches, 3, H, W) or None."""

    input_ids: Any
    labels: Any
    pixel_values: Any = None
    image_sizes: Any = None  # (2,) original (height, width) in pixels
    sample_id: str = ""
    replaced: list = dataclasses.field(default_factory=list)  # [(id, reason)] of unusable samples it stands for


def tokenize_example(processor, sample: dict, image=None, max_length: int = 4096) -> Example:
    """Tokenize one conversation with labels = input ids on answer tokens and -100 everywhere else.

    The image tag is expanded to the model's image-token count by the processor itself, so the count always
    matches what the vision tower produces. Text beyond `max_length` is cut at the end. ValueError when the
    image + first prompt does not fit (cutting image tokens would break the model) or no answer token does
    (such a sample teaches nothing).
    """
    import torch

    tok = processor.tokenizer
    sid = str(sample.get("id", "?"))
    segments = chat_segments(processor, conversation_to_messages(sample))
    image_token = getattr(processor, "image_token", "<image>")
    ids: list[int] = []
    labels: list[int] = []
    pixel_values = image_sizes = None
    first = segments[0][0]
    if not (tok.bos_token and first.startswith(tok.bos_token)):
        ids += tok("", add_special_tokens=True)["input_ids"]  # the BOS the tokenizer adds to a full prompt
        labels += [IGNORE_INDEX] * len(ids)
    for text, is_answer in segments:
        if image_token in text:
            if image is None:
                raise ValueError(f"sample {sid}: prompt has an image but no image was given")
            enc = processor(images=[image], text=[text], add_special_tokens=False, return_tensors="pt")
            piece = enc["input_ids"][0].tolist()
            pixel_values, image_sizes = enc["pixel_values"][0], enc["image_sizes"][0]
        else:
            piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if is_answer else [IGNORE_INDEX] * len(piece)
    if len(ids) > max_length:
        image_id = processor.image_token_id
        last_image = max((i for i, t in enumerate(ids) if t == image_id), default=-1)
        if last_image >= max_length - 1:
            raise ValueError(f"sample {sid}: image + prompt need {last_image + 2} tokens > max_length "
                             f"{max_length}; raise max_length")
        ids, labels = ids[:max_length], labels[:max_length]
        if all(t == IGNORE_INDEX for t in labels):
            raise ValueError(f"sample {sid}: no answer token fits in max_length {max_length}; raise max_length")
    return Example(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                   pixel_values, image_sizes, sid)


class ConversationDataset:
    """Map-style dataset over a JSONL file, read lazily by byte offset (a million samples stay cheap)."""

    def __init__(self, jsonl: str | Path, processor, max_length: int, image_root: str | Path | None = None):
        self.path = Path(jsonl)
        self.processor = processor
        self.max_length = max_length
        self.image_root = Path(image_root) if image_root else self.path.parent
        self.offsets: list[int] = []
        with open(self.path, "rb") as f:
            pos = 0
            for line in f:
                if line.strip():
                    self.offsets.append(pos)
                pos += len(line)
        if not self.offsets:
            raise ValueError(f"{self.path}: no samples")

    def __len__(self) -> int:
        return len(self.offsets)

    def sample(self, i: int) -> dict:
        with open(self.path, "rb") as f:
            f.seek(self.offsets[i])
            line = f.readline()
        try:
            return json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.path}: sample {i} is not valid JSON ({exc.msg})") from exc

    def load_image(self, rel: str):
        from PIL import Image

        p = Path(rel)
        p = p if p.is_absolute() else self.image_root / p
        if not p.is_file():
            raise FileNotFoundError(f"{p}: image not found")
        with Image.open(p) as im:
            return im.convert("RGB")

    def example(self, i: int) -> Example | tuple[str, str]:
        """The tokenized sample, or (sample id, reason) when it cannot be used."""
        s = self.sample(i)
        try:
            image = self.load_image(s["image"]) if s.get("image") else None
            return tokenize_example(self.processor, s, image, self.max_length)
        except (ValueError, FileNotFoundError, OSError) as exc:
            return (str(s.get("id", i)), str(exc).splitlines()[0])

    def __getitem__(self, i: int) -> Example:
        """Sample i, or the next usable one standing in for it (reasons kept in `replaced`), so every
        micro-batch is full and DDP ranks never fall out of step over a bad sample."""
        replaced = []
        for j in range(min(len(self), 64)):
            ex = self.example((i + j) % len(self))
            if isinstance(ex, Example):
                ex.replaced = replaced
                return ex
            replaced.append(ex)
        raise ValueError(f"{self.path}: {len(replaced)} samples in a row cannot be used "
                         f"(first: {replaced[0][0]}: {replaced[0][1]})")


def collate(examples: list, pad_id: int) -> dict:
    """Right-pad a micro-batch; pixel_values are zero-padded along patches (image_sizes says how many count).

    Returns input_ids/attention_mask/labels (batch, tokens), pixel_values (images, patches, 3, H, W) or
    absent, image_sizes (images, 2), and `skipped`: [(sample id, reason)] for unusable samples.
    """
    import torch

    good = [e for e in examples if isinstance(e, Example)]
    skipped = [e for e in examples if not isinstance(e, Example)] + [r for e in good for r in e.replaced]
    if not good:
        return {"skipped": skipped}
    n = max(len(e.input_ids) for e in good)
    ids = torch.full((len(good), n), pad_id, dtype=torch.long)
    labels = torch.full((len(good), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(good), n), dtype=torch.long)
    for r, e in enumerate(good):
        ids[r, : len(e.input_ids)] = e.input_ids
        labels[r, : len(e.labels)] = e.labels
        mask[r, : len(e.input_ids)] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "skipped": skipped}
    with_img = [e for e in good if e.pixel_values is not None]
    if with_img:
        p = max(e.pixel_values.shape[0] for e in with_img)
        pv = torch.zeros((len(with_img), p, *with_img[0].pixel_values.shape[1:]),
                         dtype=with_img[0].pixel_values.dtype)
        for r, e in enumerate(with_img):
            pv[r, : e.pixel_values.shape[0]] = e.pixel_values
        batch["pixel_values"] = pv
        batch["image_sizes"] = torch.stack([torch.as_tensor(e.image_sizes) for e in with_img])
    return batch


# ------------------------------------------------------------------------------------------------ environment
@dataclass
class Dist:
    """Where this process sits in a DDP job (torchrun / accelerate launch set the env vars)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Single process by default; a DDP process group when WORLD_SIZE > 1 (imports torch.distributed lazily)."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda: no CUDA GPU visible")
    if world <= 1:
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    import torch.distributed as tdist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local, torch.device(f"cuda:{local}" if use_cuda else "cpu"))


def _all_reduce_sum(value, dist: Dist):
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.all_reduce(value)
    return value


# ------------------------------------------------------------------------------------------------------ model
def load_processor(cfg: FinetuneConfig):
    from transformers import LlavaNextProcessor

    proc = LlavaNextProcessor.from_pretrained(cfg.processor_path or cfg.model_path)
    if cfg.image_grid_pinpoints:
        proc.image_processor.image_grid_pinpoints = [list(p) for p in cfg.image_grid_pinpoints]
    if proc.tokenizer.pad_token_id is None:
        proc.tokenizer.pad_token = proc.tokenizer.unk_token or proc.tokenizer.eos_token
    return proc


def _quantization_config(cfg: FinetuneConfig):
    """bitsandbytes config for QLoRA; a clear error when the GPU or the package is missing."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"quantization={cfg.quantization}: needs a CUDA GPU (bitsandbytes); "
                           "use quantization: none on CPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(f"quantization={cfg.quantization}: bitsandbytes is not installed "
                           "(pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    skip = ["vision_tower", "multi_modal_projector", "lm_head"]  # only the language model is quantized
    if cfg.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=_torch_dtype(cfg.dtype), llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def load_base_model(cfg: FinetuneConfig, dist: Dist):
    """The LLaVA-NeXT base in `dtype` (or 4/8-bit), vision tower frozen, ready for peft."""
    from transformers import LlavaNextForConditionalGeneration

    kwargs: dict = {"dtype": _torch_dtype(cfg.dtype), "attn_implementation": cfg.attn_implementation}
    if cfg.quantization != "none":
        kwargs["quantization_config"] = _quantization_config(cfg)
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
def _quiet_peft():
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
    with _quiet_peft():
        model = get_peft_model(base, lora)
    leaked = [n for n, p in model.named_parameters() if p.requires_grad and "vision_tower" in n]
    if leaked:
        raise RuntimeError(f"target_modules {cfg.target_modules!r} reach the vision tower ({leaked[0]}); "
                           "restrict it to the language model")
    if not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n):
        raise RuntimeError(f"target_modules {cfg.target_modules!r} matched no module of {cfg.model_path}")
    if cfg.gradient_checkpointing and cfg.quantization == "none":
        base_model, kw = model.get_base_model(), {"use_reentrant": False}
        if hasattr(base_model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    return model


def token_loss_sum(model, batch: dict) -> tuple[Any, int]:
    """Sum of next-token cross-entropy over answer tokens (fp32) and how many tokens that was."""
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}
    logits = model(**inputs, use_cache=False).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:].to(shift_logits.device)
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((shift_labels != IGNORE_INDEX).sum())


def _to_device(batch: dict, device, dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if k == "skipped":
            continue
        v = v.to(device)
        out[k] = v.to(dtype) if k == "pixel_values" else v
    return out


# ------------------------------------------------------------------------------------------------ checkpoints
def _atomic_dir(final: Path):
    """A temp folder beside `final`, renamed into place by the caller's `commit()`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))

    def commit():
        if final.exists():
            old = final.with_name(f".{final.name}.old.{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)

    return tmp, commit


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _rng_state() -> dict:
    import torch

    st = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    import torch

    v, state, gauss = st["python"]
    random.setstate((v, tuple(state), gauss))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(run: Path, step: int, model, optimizer, scheduler, cfg: FinetuneConfig, dist: Dist,
                    extra: dict) -> Path | None:
    """Adapter + optimizer + scheduler + every rank's RNG for an exact resume; oldest beyond the limit go."""
    import torch

    rngs = [_rng_state()]
    if dist.world > 1:
        import torch.distributed as tdist

        rngs = [None] * dist.world
        tdist.all_gather_object(rngs, _rng_state())
    if not dist.main:
        return None
    ck = run / "checkpoints" / f"step-{step:06d}"
    tmp, commit = _atomic_dir(ck)
    _unwrap(model).save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "training_state.pt")
    for r, st in enumerate(rngs):
        torch.save(st, tmp / f"rng-rank{r}.pt")
    _write_json(tmp / "trainer_state.json", {"step": step, "world": dist.world,
                                             "config": dataclasses.asdict(cfg), **extra})
    commit()
    kept = sorted((run / "checkpoints").glob("step-*"))
    for old in kept[: max(0, len(kept) - max(1, cfg.save_total_limit))]:
        shutil.rmtree(old, ignore_errors=True)
    return ck


def latest_checkpoint(run: Path) -> Path | None:
    cks = sorted(p for p in (run / "checkpoints").glob("step-*") if (p / "trainer_state.json").is_file())
    return cks[-1] if cks else None


_RESUME_KEYS = ("model_path", "lora_r", "lora_alpha", "target_modules", "train_projector", "seed",
                "per_device_batch_size", "grad_accum", "train_jsonl", "max_length", "quantization")


def load_checkpoint(ck: Path, model, optimizer, scheduler, cfg: FinetuneConfig, dist: Dist) -> dict:
    """Restore what save_checkpoint wrote; refuses a checkpoint made with a different model/data/LoRA."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((ck / "trainer_state.json").read_text())
    old = state.get("config", {})
    diff = [k for k in _RESUME_KEYS if str(old.get(k)) != str(getattr(cfg, k))]
    if int(state.get("world", 1)) != dist.world:
        diff.append(f"world size ({state.get('world')} processes, now {dist.world})")
    if diff:
        raise ValueError(f"{ck}: made with different {', '.join(diff)}; use a new out_dir or resume: false")
    weights = load_file(str(ck / "adapter_model.safetensors"), device=str(dist.device))
    set_peft_model_state_dict(_unwrap(model), weights)
    ts = torch.load(ck / "training_state.pt", map_location=dist.device, weights_only=True)
    optimizer.load_state_dict(ts["optimizer"])
    scheduler.load_state_dict(ts["scheduler"])
    rng = ck / f"rng-rank{dist.rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))  # python RNG tuple; our own file
    return state


def _unwrap(model):
    return model.module if hasattr(model, "module") and not hasattr(model, "peft_config") else model


# -------------------------------------------------------------------------------------------------- training
def epoch_batches(n: int, cfg: FinetuneConfig, dist: Dist, epoch: int) -> list[list[int]]:
    """This rank's micro-batches of sample indices for one epoch: a seeded shuffle, equal share per rank."""
    import torch

    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per_rank = n // dist.world
    mine = perm[dist.rank * per_rank:(dist.rank + 1) * per_rank]
    b = cfg.per_device_batch_size
    return [mine[i:i + b] for i in range(0, len(mine) - b + 1, b)]


def steps_per_epoch(n: int, cfg: FinetuneConfig, world: int) -> int:
    """Whole optimizer steps per epoch (the tail that does not fill one is left for the next shuffle)."""
    steps = ((n // world) // cfg.per_device_batch_size) // cfg.grad_accum
    if steps < 1:
        raise ValueError(f"{cfg.train_jsonl}: {n} samples cannot fill one step of {cfg.per_device_batch_size} "
                         f"x {cfg.grad_accum} accumulation x {world} processes")
    return steps


def _loader(dataset, batches: list[list[int]], cfg: FinetuneConfig, pad_id: int):
    """Its own generator, so making an iterator never draws from the global RNG (exact resume)."""
    from functools import partial

    import torch
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_sampler=batches, collate_fn=partial(collate, pad_id=pad_id),
                      num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))


class _Strict:
    """Evaluation view of a dataset: unusable samples are dropped, never stood in for (no double counting)."""

    def __init__(self, dataset: ConversationDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset.example(i)


def evaluate(model, dataset, cfg: FinetuneConfig, dist: Dist, pad_id: int) -> float:
    """Mean answer-token loss over (up to eval_max_samples of) the validation set, across ranks."""
    import torch

    n = min(len(dataset), cfg.eval_max_samples)
    idx = list(range(dist.rank, n, dist.world))
    b = cfg.per_device_batch_size
    was_training = model.training
    model.eval()
    tot = torch.zeros(2, dtype=torch.float64, device=dist.device)
    with torch.no_grad():
        for batch in _loader(_Strict(dataset), [idx[i:i + b] for i in range(0, len(idx), b)], cfg, pad_id):
            if "input_ids" not in batch:
                continue
            loss, ntok = token_loss_sum(model, _to_device(batch, dist.device, _torch_dtype(cfg.dtype)))
            tot += torch.tensor([float(loss), ntok], dtype=torch.float64, device=dist.device)
    _all_reduce_sum(tot, dist)
    model.train(was_training)
    return float(tot[0] / tot[1]) if tot[1] > 0 else float("nan")


def train(cfg: FinetuneConfig, log=print) -> Path:
    """Run (or resume) the fine-tune described by `cfg`; returns the run folder (`cfg.out_dir`)."""
    import torch

    threads = torch.get_num_threads()
    if cfg.cpu_threads > 0:  # tiny matmuls on busy shared cores: 1 thread avoids OpenMP spin-waits (~100x)
        torch.set_num_threads(cfg.cpu_threads)
    try:
        return _train(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: FinetuneConfig, log) -> Path:
    import torch
    from transformers import get_scheduler

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    dist = setup_distributed(cfg.device)
    run = Path(cfg.out_dir)
    say = log if dist.main else (lambda *_: None)
    random.seed(cfg.seed + dist.rank)
    torch.manual_seed(cfg.seed)  # identical adapter init on every rank

    processor = load_processor(cfg)
    pad_id = processor.tokenizer.pad_token_id
    train_ds = ConversationDataset(cfg.train_jsonl, processor, cfg.max_length, cfg.image_root)
    val_ds = ConversationDataset(cfg.val_jsonl, processor, cfg.max_length, cfg.image_root) if cfg.val_jsonl else None

    model = build_peft_model(cfg, load_base_model(cfg, dist))
    if cfg.quantization == "none":
        model.to(dist.device)
    model.train()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    say(f"model {cfg.model_path}: {n_all / 1e6:.2f} M params, {n_train / 1e6:.3f} M trainable "
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
        say(f"resumed from {ck} at step {step}/{total}")
    if dist.main:
        run.mkdir(parents=True, exist_ok=True)
        _save_config(cfg, run / "finetune_config.yaml")

    ddp_model = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(
            model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None,
            find_unused_parameters=cfg.ddp_find_unused_parameters)
    dtype = _torch_dtype(cfg.dtype)
    metrics = run / "metrics.jsonl"
    t0, window_loss, window_tok = time.time(), 0.0, 0
    while step < total:
        epoch, offset = divmod(step, spe)
        batches = epoch_batches(len(train_ds), cfg, dist, epoch)[: spe * cfg.grad_accum]
        it: Iterator = iter(_loader(train_ds, batches[offset * cfg.grad_accum:], cfg, pad_id))
        for _ in range(spe - offset):
            micro = [next(it) for _ in range(cfg.grad_accum)]
            for mb in micro:
                for sid, why in mb.get("skipped", []):
                    if sid not in skipped and dist.main:
                        say(f"skipping sample {sid}: {why}")
                    skipped[sid] = why
            ntok = torch.tensor(sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in micro
                                    if "labels" in mb), device=dist.device, dtype=torch.float64)
            ntok = float(_all_reduce_sum(ntok, dist))
            step_loss = 0.0
            for j, mb in enumerate(micro):
                if "input_ids" not in mb:
                    continue
                sync = j == len(micro) - 1 or dist.world == 1
                ctx = ddp_model.no_sync() if (dist.world > 1 and not sync) else nullcontext()
                with ctx:
                    loss_sum, _ = token_loss_sum(ddp_model, _to_device(mb, dist.device, dtype))
                    # DDP averages gradients over ranks, hence * world: the result is the global token mean
                    (loss_sum * dist.world / max(ntok, 1.0)).backward()
                step_loss += float(loss_sum.detach())
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_loss += float(_all_reduce_sum(torch.tensor(step_loss, dtype=torch.float64,
                                                              device=dist.device), dist))
            window_tok += ntok
            if dist.main and (step % max(1, cfg.log_every) == 0 or step == total or step == 1):
                rec = {"step": step, "epoch": round(step / spe, 4), "loss": window_loss / max(window_tok, 1),
                       "lr": scheduler.get_last_lr()[0], "answer_tokens": ntok,
                       "elapsed_s": round(time.time() - t0, 3)}
                _append_jsonl(metrics, rec)
                say(f"step {step}/{total} loss {rec['loss']:.4f} lr {rec['lr']:.2e}")
                window_loss, window_tok = 0.0, 0
            if val_ds is not None and cfg.eval_every > 0 and step % cfg.eval_every == 0 and step < total:
                _log_eval(model, val_ds, cfg, dist, pad_id, step, metrics, say)
            if cfg.save_every > 0 and step % cfg.save_every == 0 and step < total:
                save_checkpoint(run, step, model, optimizer, scheduler, cfg, dist, {"skipped": skipped})
            if step >= total:
                break
    if val_ds is not None:
        _log_eval(model, val_ds, cfg, dist, pad_id, step, metrics, say)
    save_checkpoint(run, step, model, optimizer, scheduler, cfg, dist, {"skipped": skipped})
    if dist.main:
        tmp, commit = _atomic_dir(run / "adapter")
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        commit()
        say(f"adapter -> {run / 'adapter'}")
        if cfg.merge:
            merge_adapter(cfg.model_path, run / "adapter", run / "merged", cfg.merge_dtype,
                          processor_path=cfg.processor_path, image_grid_pinpoints=cfg.image_grid_pinpoints)
            say(f"merged checkpoint -> {run / 'merged'}")
        _write_json(run / "manifest.json", _manifest(cfg, step, total, len(train_ds), val_ds, skipped, n_train))
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()
    return run


def _log_eval(model, val_ds, cfg, dist, pad_id, step, metrics, say) -> None:
    val = evaluate(model, val_ds, cfg, dist, pad_id)
    if dist.main:
        _append_jsonl(metrics, {"step": step, "val_loss": val})
        say(f"step {step} val_loss {val:.4f}")


def _append_jsonl(path: Path, rec: dict) -> None:
    with open(path, "a") as f:  # append-only log: a torn last line is the worst case
        f.write(json.dumps(rec) + "\n")


def _save_config(cfg: FinetuneConfig, path: Path) -> None:
    import yaml

    d = dataclasses.asdict(cfg)
    d["adam_betas"] = list(d["adam_betas"])
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(d, sort_keys=False))
    os.replace(tmp, path)


def _manifest(cfg, step, total, n_train, val_ds, skipped, n_trainable) -> dict:
    import peft
    import torch
    import transformers

    return {"config": dataclasses.asdict(cfg), "steps": step, "total_steps": total, "train_samples": n_train,
            "val_samples": len(val_ds) if val_ds is not None else 0, "trainable_params": n_trainable,
            "skipped_samples": skipped,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__}}


def merge_adapter(base_path: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "bf16",
                  processor_path: str | Path | None = None,
                  image_grid_pinpoints: list[list[int]] | None = None) -> Path:
    """Base (reloaded unquantized in `dtype`) + adapter -> merged HF checkpoint + processor, written atomically.

    The result loads with `LlavaNextForConditionalGeneration.from_pretrained` and is what vLLM serves
    (vLLM's LLaVA-NeXT does not take LoRA adapters at serve time; see the module's report).
    """
    from peft import PeftModel
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    base = LlavaNextForConditionalGeneration.from_pretrained(str(base_path), dtype=_torch_dtype(dtype))
    if image_grid_pinpoints:
        base.config.image_grid_pinpoints = [list(p) for p in image_grid_pinpoints]
    with _quiet_peft():
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    src = Path(adapter_dir) if (Path(adapter_dir) / "processor_config.json").exists() else \
        Path(processor_path or base_path)
    processor = LlavaNextProcessor.from_pretrained(str(src))
    tmp, commit = _atomic_dir(Path(out_dir))
    merged.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    commit()
    return Path(out_dir)


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
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(_cli(sys.argv[1:]))
