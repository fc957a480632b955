"""A learned trace segmenter: working page (RGB) -> trace map on the ink map's 0-255 scale (> INK_ON = trace).

Why: the classical ink map (`ink.ink_map`) keeps anything darker than the paper — text, stamps, grey grid
lines, photocopy smudges — and loses faint or shaded pen lines. A small U-Net trained on the renderer's
pixel-exact pen labels (`trace_labels`, `training/train_segmenter.py`) keeps only what the pen drew (traces,
calibration pulses, separator ticks), so the classical row finding and trace following (`rows`) run on it
unchanged. Small and CPU-fast on purpose: the page is folded fold x fold into channels (pixel unshuffle, 4x4
shipped) so every convolution runs at 1/fold resolution or less, and the output unfolds back to full
resolution, which keeps one-pixel pen lines sharp. Weights are safetensors beside a JSON manifest (config, training, sha256).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from rag_ecg.errors import ArtifactError, InputError
from rag_ecg.io import atomic_write, write_json
from rag_ecg.paper.ink import INK_ON

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "trace_segmenter.safetensors"
FORMAT = "rag-ecg-trace-segmenter/1"


@dataclass
class SegmenterConfig:
    """The network's shape (saved in the manifest; the weights only load into the same shape)."""

    widths: list[int] = field(default_factory=lambda: [24, 32, 48, 64])  # channels per U-Net level
    fold: int = 4  # pixel-unshuffle factor: convolutions run at 1/fold of the working resolution
    convs: int = 2  # 3x3 convolutions per level and direction

    def __post_init__(self):
        if not self.widths or any(int(c) < 1 for c in self.widths):
            raise ValueError(f"widths: {self.widths} must be a non-empty list of positive channel counts")
        if self.fold not in (1, 2, 4):
            raise ValueError(f"fold: {self.fold} is not 1, 2 or 4")
        if self.convs < 1:
            raise ValueError(f"convs: {self.convs} must be at least 1")

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of this (pages are padded to it)."""
        return self.fold * 2 ** (len(self.widths) - 1)


def _block(c_in: int, c_out: int, n: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class TraceUNet(nn.Module):
    """(N, 3, H, W) float in [0, 1] -> (N, 1, H, W) trace logits; H, W multiples of `cfg.multiple`."""

    def __init__(self, cfg: SegmenterConfig):
        super().__init__()
        self.cfg = cfg
        w, f = list(cfg.widths), cfg.fold
        self.fold_in = nn.PixelUnshuffle(f)
        self.downs = nn.ModuleList([_block(3 * f * f, w[0], cfg.convs)])
        self.downs.extend(_block(w[i - 1], w[i], cfg.convs) for i in range(1, len(w)))
        self.ups = nn.ModuleList(_block(w[i + 1] + w[i], w[i], cfg.convs) for i in range(len(w) - 1))
        self.head = nn.Conv2d(w[0], f * f, 1)
        self.fold_out = nn.PixelShuffle(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fold_out(self.head_logits(self.fold_in(x) - 0.5))

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, fold², H/fold, W/fold) logits of the pixel-unshuffled, centred input (before the unfold)."""
        skips = []
        for i, down in enumerate(self.downs):
            x = down(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        for i in range(len(self.ups) - 1, -1, -1):
            x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
            x = self.ups[i](torch.cat([x, skips[i]], dim=1))
        return self.head(x)


class TraceSegmenter:
    """A loaded segmenter: `trace_map(work_rgb)` on one page at a time (CPU).

    Inference runs a copy of the network with each batch norm folded into its convolution, and the
    pixel unshuffle done on the uint8 page in NumPy: together ~1/3 faster than the training graph.
    """

    def __init__(self, net: TraceUNet, manifest: dict | None = None):
        self.cfg = net.cfg
        self.trained = net  # the network as trained and saved (batch norms apart)
        self.net = _fold_batch_norms(net)
        self.manifest = manifest or {}

    @torch.inference_mode()
    def trace_map(self, work_rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB working page -> (H, W) uint8 trace strength 0-255 (255·probability).

        Runs on torch's current intra-op threads (one thread: ~0.3 s for a 1600x1130 page)."""
        if work_rgb.ndim != 3 or work_rgb.shape[2] != 3 or work_rgb.dtype != np.uint8:
            raise InputError(f"trace_map expects an (H, W, 3) uint8 RGB page, got {work_rgb.dtype} {work_rgb.shape}")
        h, w = work_rgb.shape[:2]
        m, f = self.cfg.multiple, self.cfg.fold
        # replicate the border: a constant pad would draw an edge the net might read as a line
        page = cv2.copyMakeBorder(work_rgb, 0, -h % m, 0, -w % m, cv2.BORDER_REPLICATE)
        hh, ww = page.shape[:2]
        folded = page.reshape(hh // f, f, ww // f, f, 3).transpose(4, 1, 3, 0, 2).reshape(3 * f * f, hh // f, ww // f)
        x = torch.from_numpy(np.ascontiguousarray(folded))[None].float().mul_(1.0 / 255.0).sub_(0.5)
        p = torch.sigmoid_(self.net.fold_out(self.net.head_logits(x)))[0, 0, :h, :w]
        return _drop_specks(p.mul_(255.0).add_(0.5).to(torch.uint8).numpy())


def _drop_specks(trace: np.ndarray) -> np.ndarray:
    """Zero small blobs far from any pen line (dust the net kept): one beside a row would stretch the row's extent
    past its calibration pulse (seen on scans: the time axis then slid by the pulse's width). Small pieces next to
    a line (a broken QRS stroke) stay."""
    on = (trace > INK_ON).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(on, connectivity=8)
    small = stats[:, cv2.CC_STAT_AREA] < max(6, (trace.shape[1] // 320) ** 2)
    small[0] = False
    if not small.any():
        return trace
    lines = cv2.dilate(np.where(small[labels], 0, on).astype(np.uint8), np.ones((9, 9), np.uint8))
    near = np.zeros(n, bool)
    near[np.unique(labels[(lines > 0) & (on > 0)])] = True
    trace[(small & ~near)[labels]] = 0
    return trace


def _fold_batch_norms(net: TraceUNet) -> TraceUNet:
    """An eval-mode copy of `net` with every (conv, batch norm) pair fused into one conv."""
    net = copy.deepcopy(net).eval()
    for block in net.modules():
        if isinstance(block, nn.Sequential):
            for i in range(len(block) - 1):
                if isinstance(block[i], nn.Conv2d) and isinstance(block[i + 1], nn.BatchNorm2d):
                    block[i] = fuse_conv_bn_eval(block[i], block[i + 1])
                    block[i + 1] = nn.Identity()
    return net


# ---------------------------------------------------------------- weights


def _blob(net: TraceUNet) -> bytes:
    state = {k: v.detach().contiguous().cpu().clone() for k, v in net.state_dict().items()}
    return st_save(state)


def manifest_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def save_segmenter(net: TraceUNet, path: str | Path, **info) -> Path:
    """Write `path` (safetensors) and its manifest `path.json` (config, sha256, and `info`: training, figures)."""
    path = Path(path)
    blob = _blob(net)
    atomic_write(path, blob)
    manifest = {"format": FORMAT, "config": asdict(net.cfg), "weights": path.name,
                "weights_sha256": hashlib.sha256(blob).hexdigest(), **info}
    write_json(manifest_path(path), manifest, sort_keys=True)
    return path


def load_segmenter(path: str | Path) -> TraceSegmenter:
    """A saved segmenter; a missing, corrupt or mismatched file is an ArtifactError naming it."""
    path = Path(path)
    mpath = manifest_path(path)
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        blob = path.read_bytes()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: cannot read the trace segmenter ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: not a trace segmenter manifest (format {FORMAT})")
    if hashlib.sha256(blob).hexdigest() != manifest.get("weights_sha256"):
        raise ArtifactError(f"{path}: sha256 does not match its manifest {mpath.name} (corrupt or replaced file)")
    try:
        net = TraceUNet(SegmenterConfig(**manifest["config"]))
        net.load_state_dict(st_load(blob))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: weights do not fit the manifest's network "
                            f"({str(exc).splitlines()[0]})") from None
    return TraceSegmenter(net, manifest)


@lru_cache(maxsize=1)
def default_segmenter() -> TraceSegmenter | None:
    """The shipped segmenter (loaded once), or None where the weights are not installed."""
    if not DEFAULT_WEIGHTS.is_file():
        log.info(f"no trace segmenter at {DEFAULT_WEIGHTS}: the classical ink map is used")
        return None
    return load_segmenter(DEFAULT_WEIGHTS)


def trace_map(work_rgb: np.ndarray, segmenter: TraceSegmenter | None = None) -> np.ndarray:
    """The shipped (or given) segmenter's trace map of a working page; ArtifactError if none is installed."""
    seg = segmenter or default_segmenter()
    if seg is None:
        raise ArtifactError(f"no trace segmenter weights at {DEFAULT_WEIGHTS}")
    return seg.trace_map(work_rgb)
