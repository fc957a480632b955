"""Page -> model input, deterministically: letterboxed pixels for image towers, digitised traces for the trace tower.

Input geometry: a paper ECG is a wide page (3x4 on letter/A4 is ~1.3-1.4 : 1) whose information is in thin
traces; squashing it into a square wastes a third of the pixels on nothing or distorts the time and voltage
axes differently. Every image config therefore takes a non-square landscape input (H x W, e.g. 256 x 352 =
1 : 1.375, between letter and A4), and preprocessing letterboxes the page into it: keep the aspect ratio, fit,
pad with white paper, area-average on the way down (thin lines fade rather than vanish). Training-time variety
comes from the renderer's layouts and print/scan/photo artifacts, never from random crops that could cut
leads away.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from rag_ecg.paper.digitize import DigitizeError, canonicalize, digitize


@dataclass(frozen=True)
class Preprocess:
    """Page -> model input: letterbox to (height, width) on white, then per-channel normalisation."""

    height: int  # model input height in pixels
    width: int  # model input width in pixels (wider than high: ECG pages are landscape)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel mean subtracted after scaling to [0, 1]
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel divisor after mean subtraction
    fill: int = 255  # letterbox padding grey level (255: paper white)

    def letterbox(self, image: Image.Image) -> Image.Image:
        """Fit the page inside (width, height) keeping its aspect; area-averaged, centred on `fill`."""
        img = image.convert("RGB") if image.mode != "RGB" else image
        w, h = img.size
        if w < 1 or h < 1:
            raise ValueError(f"image of size {w}x{h} cannot be encoded")
        scale = min(self.width / w, self.height / h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        if (nw, nh) != (w, h):
            resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
            img = img.resize((nw, nh), resample, reducing_gap=None)
        if (nw, nh) == (self.width, self.height):
            return img
        canvas = Image.new("RGB", (self.width, self.height), (self.fill,) * 3)
        canvas.paste(img, ((self.width - nw) // 2, (self.height - nh) // 2))
        return canvas

    def pixels(self, image: Image.Image, strict: bool = True) -> np.ndarray:
        """PIL image -> (height, width, 3) uint8 letterboxed page (cheap to pass between processes).

        `strict` (a user's picture): the page must hold trace rows the digitiser can find, or `DigitizeError`
        says why — the same not-an-ECG check the trace tower makes. An image tower embeds anything, and its
        similarity floor alone let a noisy photo through once the encoder was trained. `strict=False`: library
        renders and training pages, ECGs by construction."""
        img = image.convert("RGB") if image.mode != "RGB" else image
        if strict:
            digitize(np.asarray(img))
        return np.array(self.letterbox(img), dtype=np.uint8)  # a writable copy

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, H, W, 3) uint8 -> (n, 3, H, W) float32 normalised model input (on the tensor's device)."""
        x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std).contiguous()

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image (any mode/size) -> (3, height, width) float32 normalised tensor."""
        return self.normalize(torch.from_numpy(self.pixels(image))[None])[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one `pixels()` array: (height, width, 3) uint8."""
        return (self.height, self.width, 3)

    def to_dict(self) -> dict:
        return asdict(self)

    def open_clip_cfg(self) -> dict:
        """The nearest open_clip preprocess_cfg (for `local-dir:` loading outside rag-ecg)."""
        return {"size": [self.height, self.width], "mode": "RGB", "mean": list(self.mean), "std": list(self.std),
                "interpolation": "bicubic", "resize_mode": "longest", "fill_color": self.fill}


@dataclass(frozen=True)
class TracePreprocess:
    """Page -> digitised 12-lead traces (`rag_ecg.paper.digitize`) -> (24, N) float32: traces, then where printed.

    The trace tower's input. A picture the digitiser cannot read (no trace rows: a blank page, a photo
    of something else) raises `DigitizeError` naming why — that is the not-an-ECG check for this tower;
    with `strict=False` (training and library renders, which are ECGs by construction) it reads as
    all zeros ("nothing legible") so a batch never dies on one hard page.
    """

    n_samples: int = 1000  # samples on the canonical 10-s axis (digitize.N_SAMPLES)
    kind: str = "trace"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (24, self.n_samples)

    def pixels(self, image: Image.Image, strict: bool = True) -> np.ndarray:
        """PIL page (any mode/size) -> (24, n_samples) float32 model input."""
        arr = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
        if arr.shape[0] < 8 or arr.shape[1] < 8:
            raise ValueError(f"image of size {arr.shape[1]}x{arr.shape[0]} cannot be encoded")
        try:
            d = digitize(np.ascontiguousarray(arr))
        except DigitizeError:
            if strict:
                raise
            return np.zeros(self.input_shape, np.float32)
        return self.stack(d.signal, d.mask)

    @staticmethod
    def stack(signal: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(12, N) traces + (12, N) printed-mask -> (24, N) float32 (traces zeroed where not printed)."""
        m = mask.astype(np.float32)
        return np.concatenate([signal.astype(np.float32) * m, m]).astype(np.float32)

    def from_signal(self, record, rng: np.random.Generator) -> np.ndarray:
        """What the digitiser would read off a random printed layout of `record` (pre-training input).

        Layouts, rhythm lead and start time are drawn as `render.random_config` draws them; the read's
        errors are imitated by `read_errors`.
        """
        layout = ("3x4+II", "3x4", "6x2", "12x1")[int(rng.choice(4, p=[0.45, 0.2, 0.2, 0.15]))]
        rhythm = ("II", "V1", "V5")[int(rng.choice(3, p=[0.85, 0.1, 0.05]))]
        start = float(rng.uniform(0.0, max(0.0, record.duration_s - 10.0)))
        sig, mask = canonicalize(record.signal_mv(), record.fs, layout, rhythm, start)
        return self.stack(*read_errors(sig, mask, rng))

    def perfect_read(self, record, layout: str = "3x4+II") -> np.ndarray:
        """`record`'s first 10 s as a flawless read of a `layout` page: how a library case is embedded
        straight from its signal (a perfect read of its page equals the signal; no render, no digitiser)."""
        return self.stack(*canonicalize(record.signal_mv(), record.fs, layout, "II", 0.0))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 24, N) float32 -> the same, as float32 on the tensor's device."""
        return pixels.float().contiguous()

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(self.pixels(image))

    def to_dict(self) -> dict:
        return asdict(self)

    def open_clip_cfg(self) -> dict:
        return {"kind": "trace", "n_samples": self.n_samples}


def read_errors(sig: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(12, N) page-normalised traces + mask -> the same with the errors real reads carry.

    Measured on fold-9 photo pages against their signals: amplitudes read ~10 % low (pen width rounds the
    peaks off; per-lead gain IQR 0.82-0.99), columns land +-2 samples off (+-20 ms), the residual is mostly
    high-frequency, and pieces of a lead go missing where ink was lost.
    """
    sig = sig * float(rng.uniform(0.8, 1.2)) * rng.uniform(0.8, 1.05, (12, 1)).astype(np.float32)
    width = int(rng.integers(1, 5))
    if width > 1:
        kernel = np.ones(width, np.float32) / width
        sig = np.stack([np.convolve(row, kernel, "same") for row in sig])
    shifts = rng.integers(-2, 3, 12)
    sig = np.stack([np.roll(row, int(d)) for row, d in zip(sig, shifts)])
    sig = sig + rng.normal(0.0, float(rng.uniform(0.01, 0.08)), sig.shape).astype(np.float32)
    mask = mask.copy()
    if rng.random() < 0.3:
        lead, n = int(rng.integers(12)), int(rng.integers(20, 100))
        a = int(rng.integers(0, sig.shape[1] - n))
        mask[lead, a:a + n] = False
    return sig.astype(np.float32) * mask, mask


def preprocess_for(model_cfg: Mapping) -> Preprocess | TracePreprocess:
    """The preprocessing a model config implies: traces for a trace tower, else a letterbox at its input size."""
    if "trace_tower" in model_cfg["vision_cfg"]:
        return TracePreprocess(n_samples=int(model_cfg["vision_cfg"]["trace_tower"].get("n_samples", 1000)))
    size = model_cfg["vision_cfg"]["image_size"]
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return Preprocess(height=h, width=w)


def preprocess_from_dict(saved: Mapping) -> Preprocess | TracePreprocess:
    """The preprocessing a checkpoint manifest recorded (`to_dict()` of either kind, lists for tuples)."""
    if saved.get("kind") == "trace":
        return TracePreprocess(**saved)
    return Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
