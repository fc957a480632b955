"""Image towers of our own that open_clip does not ship: the 1-D CNN over digitised traces.

A tower is a plain top-level `nn.Module` (picklable, inspectable) that implements open_clip's tower hooks
(`lock`, `set_grad_checkpointing`), so `CLIP.lock_image_tower` and gradient checkpointing work on it as on
open_clip's own towers. Parameter names are part of the checkpoint format: renaming a submodule breaks every
saved encoder.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

TRACE_WIDTHS = (32, 64, 96, 128, 192)  # channels of the trace tower's conv blocks (default config)


def _conv_block(i: int, o: int) -> nn.Sequential:
    """Downsample time by 2 (kernel 7) then refine (kernel 5), each conv batch-normed and ReLU'd."""
    return nn.Sequential(nn.Conv1d(i, o, 7, 2, 3, bias=False), nn.BatchNorm1d(o), nn.ReLU(inplace=True),
                         nn.Conv1d(o, o, 5, 1, 2, bias=False), nn.BatchNorm1d(o), nn.ReLU(inplace=True))


class TraceTower(nn.Module):
    """(n, 24, N) traces -> (n, embed_dim): strided conv blocks, mean+max pooled over time, linear."""

    def __init__(self, embed_dim: int, widths: Sequence[int] = TRACE_WIDTHS, in_channels: int = 24):
        super().__init__()
        chans = [in_channels, *widths]
        self.features = nn.Sequential(*[_conv_block(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.proj = nn.Linear(2 * chans[-1], embed_dim)
        self.grad_checkpointing = False
        self._frozen_norms: list[nn.Module] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            h = checkpoint_sequential(self.features, len(self.features), x, use_reentrant=False)
        else:
            h = self.features(x)
        return self.proj(torch.cat([h.mean(-1), h.amax(-1)], 1))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """open_clip's hook: recompute each conv block in the backward pass instead of storing it."""
        self.grad_checkpointing = enable

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """open_clip's hook (`CLIP.lock_image_tower`): freeze the tower except its last `unlocked_groups`
        groups (each conv block is a group, the projection the last); `freeze_bn_stats` also keeps
        the frozen blocks' batch-norm statistics fixed (they stay in eval mode while training)."""
        groups = [*self.features, self.proj]
        frozen = groups[:max(0, len(groups) - unlocked_groups)]
        for g in frozen:
            for p in g.parameters():
                p.requires_grad = False
        if freeze_bn_stats:
            self._frozen_norms = [m for g in frozen for m in g.modules() if isinstance(m, nn.BatchNorm1d)]
            self.train(self.training)

    def train(self, mode: bool = True) -> "TraceTower":
        super().train(mode)
        for m in self._frozen_norms:
            m.eval()
        return self
