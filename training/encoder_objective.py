"""What the encoder recipe optimises: CLIP + superclass head behind one forward (what DDP wraps), the loss,
AdamW parameter groups, the warm-up + cosine schedule and the mixed-precision context."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from open_clip import ClipLoss


class TrainModule(torch.nn.Module):
    """CLIP + optional superclass head behind one forward (what DDP wraps)."""

    def __init__(self, encoder):
        super().__init__()
        self.clip, self.aux_head = encoder.model, encoder.aux_head
        self._aux = encoder.aux_logits

    def forward(self, pixels, tokens):
        img = F.normalize(self.clip.encode_image(pixels), dim=-1)
        txt = F.normalize(self.clip.encode_text(tokens), dim=-1)
        aux = self._aux(img.float()) if self.aux_head is not None else None
        return img, txt, self.clip.logit_scale.exp(), aux


class Objective:
    """ClipLoss (open_clip) + aux_weight * multi-label BCE; returns (total, parts dict of floats)."""

    def __init__(self, aux_weight: float, rank: int = 0, world: int = 1):
        self.clip = ClipLoss(local_loss=world > 1, gather_with_grad=world > 1, cache_labels=True,
                             rank=rank, world_size=world)
        self.aux_weight = aux_weight

    def __call__(self, img, txt, scale, aux, labels):
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


def autocast(precision: str):
    """The forward's precision context: fp32 plain, bf16/fp16 CUDA autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
