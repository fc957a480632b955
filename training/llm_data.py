"""The fine-tune's data: LLaVA conversations -> chat messages -> token ids with answer-only labels, a lazy
JSONL dataset that stands a usable sample in for a broken one, padding collate, and each rank's batches."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from rag_ecg.data.images import load_image as load_picture
from rag_ecg.errors import ConfigError, InputError
from training.common import Dist
from training.finetune_config import FinetuneConfig

IGNORE_INDEX = -100
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# ---------------------------------------------------------------------------------------------- tokens
def conversation_to_messages(sample: dict) -> list[dict]:
    """LLaVA `conversations` -> chat messages with content parts; the `<image>` tag becomes an image part."""
    conv = sample.get("conversations")
    sid = sample.get("id", "?")
    if not isinstance(conv, list) or not conv:
        raise InputError(f"sample {sid}: 'conversations' missing or empty")
    messages, n_images = [], 0
    for turn in conv:
        role = _ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise InputError(f"sample {sid}: unknown speaker {turn.get('from')!r} (human/gpt/system expected)")
        value = str(turn.get("value", ""))
        parts: list[dict] = []
        if "<image>" in value:
            n_images += value.count("<image>")
            value = value.replace("<image>", "").strip()
            parts.append({"type": "image"})
        parts.append({"type": "text", "text": value})
        messages.append({"role": role, "content": parts})
    if n_images > 1:
        raise InputError(f"sample {sid}: {n_images} <image> tags; one image per sample is supported")
    if n_images and not sample.get("image"):
        raise InputError(f"sample {sid}: has an <image> tag but no 'image' path")
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"sample {sid}: no gpt/assistant turn to learn from")
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
            raise InputError("conversation starts with an assistant turn")
        prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise InputError("chat template is not prefix-stable; cannot locate the answer tokens")
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
                raise InputError(f"sample {sid}: prompt has an image but no image was given")
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
            raise InputError(f"sample {sid}: image + prompt need {last_image + 2} tokens > max_length "
                             f"{max_length}; raise max_length")
        ids, labels = ids[:max_length], labels[:max_length]
        if all(t == IGNORE_INDEX for t in labels):
            raise InputError(f"sample {sid}: no answer token fits in max_length {max_length}; raise max_length")
    return Example(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                   pixel_values, image_sizes, sid)


# ---------------------------------------------------------------------------------------------- dataset
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
            raise InputError(f"{self.path}: no samples")

    def __len__(self) -> int:
        return len(self.offsets)

    def sample(self, i: int) -> dict:
        with open(self.path, "rb") as f:
            f.seek(self.offsets[i])
            line = f.readline()
        try:
            return json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{self.path}: sample {i} is not valid JSON ({exc.msg})") from exc

    def load_image(self, rel: str):
        p = Path(rel)
        p = p if p.is_absolute() else self.image_root / p
        if not p.is_file():
            raise FileNotFoundError(f"{p}: image not found")
        return load_picture(p)

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
        raise InputError(f"{self.path}: {len(replaced)} samples in a row cannot be used "
                         f"(first: {replaced[0][0]}: {replaced[0][1]})")


class StrictView:
    """Evaluation view of a dataset: unusable samples are dropped, never stood in for (no double counting)."""

    def __init__(self, dataset: ConversationDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset.example(i)


def collate(examples: list, pad_id: int) -> dict:
    """Right-pad a micro-batch; pixel_values are zero-padded along patches (image_sizes says how many count).

    Returns input_ids/attention_mask/labels (batch, tokens), pixel_values (images, patches, 3, H, W) or
    absent, image_sizes (images, 2), and `skipped`: [(sample id, reason)] for unusable samples.
    """
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


# ---------------------------------------------------------------------------------------------- batches
def epoch_batches(n: int, cfg: FinetuneConfig, dist: Dist, epoch: int) -> list[list[int]]:
    """This rank's micro-batches of sample indices for one epoch: a seeded shuffle, equal share per rank."""
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
        raise ConfigError(f"{cfg.train_jsonl}: {n} samples cannot fill one step of {cfg.per_device_batch_size} "
                          f"x {cfg.grad_accum} accumulation x {world} processes")
    return steps


def make_loader(dataset, batches: list[list[int]], cfg: FinetuneConfig, pad_id: int) -> DataLoader:
    """Its own generator, so making an iterator never draws from the global RNG (exact resume)."""
    return DataLoader(dataset, batch_sampler=batches, collate_fn=partial(collate, pad_id=pad_id),
                      num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
