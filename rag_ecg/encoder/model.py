"""The CLIP-style ECG dual encoder: open_clip image tower for paper-ECG pages, text tower for reports.

Input geometry: a paper ECG is a wide page (3x4 on letter/A4 is ~1.3-1.4 : 1) whose information is in
thin traces; squashing it into a square wastes a third of the pixels on nothing or distorts the time
and voltage axes differently. Every config here therefore takes a non-square landscape input (H x W,
e.g. 256 x 352 = 1 : 1.375, between letter and A4), and preprocessing letterboxes the page into it:
keep the aspect ratio, fit, pad with white paper, area-average on the way down (thin lines fade rather
than vanish). That is deterministic at inference; training-time variety comes from the renderer's
layouts and print/scan/photo artifacts, never from random crops that could cut leads away.

Text side: PTB-XL reports are mostly German, so a case's text is the English descriptions of its
SCP-ECG codes followed by the report (`case_text`), tokenized by open_clip's offline SimpleTokenizer.

Checkpoints are folders: `open_clip_model.safetensors` (the CLIP weights; `checkpoint_hash` is their
sha256), `open_clip_config.json` (so `open_clip.create_model("local-dir:<folder>")` also reads it),
optional `aux_head.safetensors` (a superclass head used in training), and `manifest.json` (config,
preprocessing, training-data hash, metrics, versions, created time). Never pickle.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from copy import deepcopy
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rag_ecg.errors import ArtifactError

if TYPE_CHECKING:
    import torch
    from PIL import Image

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
MODEL_NAMES = ("ecg-clip-tiny", "ecg-clip-cpu", "ecg-clip-trace", "ecg-clip-b16")
FORMAT = "rag-ecg-encoder/1"
MANIFEST = "manifest.json"
WEIGHTS = "open_clip_model.safetensors"
AUX_WEIGHTS = "aux_head.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
CASE_TEXT_VERSION = "codes-then-report/1"

_registered = False


class EncoderLoadError(ArtifactError):
    """A checkpoint folder that cannot be used; the message names the folder and what does not match."""


def register_model_configs() -> list[str]:
    """Make the repo's model configs (rag_ecg/encoder/model_configs/*.json) known to open_clip; idempotent."""
    global _registered
    import open_clip

    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def model_config(name: str) -> dict:
    """The open_clip model config (dict) of a registered name, e.g. 'ecg-clip-cpu'."""
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"{name}: unknown encoder model config (known: {', '.join(register_model_configs())})")
    return cfg


# ---------------------------------------------------------------- text


def case_text(report: str, codes: Mapping[str, float] | None, descriptions: Mapping[str, str] | None) -> str:
    """The text of a case: English SCP-code descriptions (most likely first), then the free-text report.

    English first because the tokenizer keeps only the first 77 tokens and the descriptions are the part
    every case shares a language for; unknown codes appear as the code itself.
    """
    descriptions = descriptions or {}
    ordered = sorted((codes or {}).items(), key=lambda kv: (-float(kv[1] or 0.0), kv[0]))
    parts, seen = [], set()
    for code, _ in ordered:
        d = (descriptions.get(code) or code).strip()
        if d and d.lower() not in seen:
            seen.add(d.lower())
            parts.append(d)
    head = "; ".join(parts)
    report = " ".join((report or "").split())
    if head and report:
        return f"{head}. {report}"
    return head or report


class Tokenizer:
    """open_clip's SimpleTokenizer (BPE vocabulary shipped in the package: works offline)."""

    def __init__(self, context_length: int = 77):
        from open_clip.tokenizer import SimpleTokenizer

        self.context_length = context_length
        self._tok = SimpleTokenizer(context_length=context_length)

    def __call__(self, texts: Sequence[str]) -> "torch.Tensor":
        """list of str -> (n, context_length) int64 token ids (truncated, end-of-text kept)."""
        return self._tok(list(texts), context_length=self.context_length)


# ---------------------------------------------------------------- images


@dataclass(frozen=True)
class Preprocess:
    """Page -> model input: letterbox to (height, width) on white, then per-channel normalisation."""

    height: int  # model input height in pixels
    width: int  # model input width in pixels (wider than high: ECG pages are landscape)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel mean subtracted after scaling to [0, 1]
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel divisor after mean subtraction
    fill: int = 255  # letterbox padding grey level (255: paper white)

    def letterbox(self, image: "Image.Image") -> "Image.Image":
        """Fit the page inside (width, height) keeping its aspect; area-averaged, centred on `fill`."""
        from PIL import Image

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

    def pixels(self, image: "Image.Image", strict: bool = True) -> np.ndarray:
        """PIL image -> (height, width, 3) uint8 letterboxed page (cheap to pass between processes).
        (`strict` is for the trace tower's unreadable pages; any picture letterboxes.)"""
        return np.array(self.letterbox(image), dtype=np.uint8)  # a writable copy

    def normalize(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """(n, H, W, 3) uint8 -> (n, 3, H, W) float32 normalised model input (on the tensor's device)."""
        import torch

        x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std).contiguous()

    def __call__(self, image: "Image.Image") -> "torch.Tensor":
        """PIL image (any mode/size) -> (3, height, width) float32 normalised tensor."""
        import torch

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

    def pixels(self, image: "Image.Image", strict: bool = True) -> np.ndarray:
        """PIL page (any mode/size) -> (24, n_samples) float32 model input."""
        from rag_ecg.paper.digitize import DigitizeError, digitize

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

        Layouts, rhythm lead and start time are drawn as `render.random_config` draws them; a
        per-page gain and a little noise stand in for the digitiser's scale and pixel errors.
        """
        from rag_ecg.paper.digitize import canonicalize

        layout = ("3x4+II", "3x4", "6x2", "12x1")[int(rng.choice(4, p=[0.45, 0.2, 0.2, 0.15]))]
        rhythm = ("II", "V1", "V5")[int(rng.choice(3, p=[0.85, 0.1, 0.05]))]
        start = float(rng.uniform(0.0, max(0.0, record.duration_s - 10.0)))
        sig, mask = canonicalize(record.signal_mv(), record.fs, layout, rhythm, start)
        sig = sig * float(rng.uniform(0.8, 1.25)) + rng.normal(0.0, 0.02, sig.shape).astype(np.float32) * mask
        return self.stack(sig, mask)

    def normalize(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """(n, 24, N) float32 -> the same, as float32 on the tensor's device."""
        return pixels.float().contiguous()

    def __call__(self, image: "Image.Image") -> "torch.Tensor":
        import torch

        return torch.from_numpy(self.pixels(image))

    def to_dict(self) -> dict:
        return asdict(self)

    def open_clip_cfg(self) -> dict:
        return {"kind": "trace", "n_samples": self.n_samples}


class TraceTower:
    """Factory for the 1-D CNN image tower over digitised traces (a torch module, built lazily)."""

    @staticmethod
    def build(embed_dim: int, widths: Sequence[int] = (32, 64, 96, 128, 192), in_channels: int = 24):
        import torch
        from torch import nn

        def block(i: int, o: int) -> nn.Module:
            return nn.Sequential(nn.Conv1d(i, o, 7, 2, 3, bias=False), nn.BatchNorm1d(o), nn.ReLU(inplace=True),
                                 nn.Conv1d(o, o, 5, 1, 2, bias=False), nn.BatchNorm1d(o), nn.ReLU(inplace=True))

        class _Tower(nn.Module):
            """(n, 24, N) traces -> (n, embed_dim): strided conv blocks, mean+max pooled over time, linear."""

            def __init__(self):
                super().__init__()
                chans = [in_channels, *widths]
                self.features = nn.Sequential(*[block(a, b) for a, b in zip(chans[:-1], chans[1:])])
                self.proj = nn.Linear(2 * chans[-1], embed_dim)
                self.grad_checkpointing = False
                self._frozen_norms: list[nn.Module] = []

            def forward(self, x: "torch.Tensor") -> "torch.Tensor":
                if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                    from torch.utils.checkpoint import checkpoint_sequential

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

            def train(self, mode: bool = True):
                super().train(mode)
                for m in self._frozen_norms:
                    m.eval()
                return self

        return _Tower()


def _preprocess_for(model_cfg: dict):
    if "trace_tower" in model_cfg["vision_cfg"]:
        return TracePreprocess(n_samples=int(model_cfg["vision_cfg"]["trace_tower"].get("n_samples", 1000)))
    size = model_cfg["vision_cfg"]["image_size"]
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return Preprocess(height=h, width=w)


# ---------------------------------------------------------------- the encoder


class ECGEncoder:
    """A CLIP dual encoder over ECG pages and report text; embeddings are L2-normalised float32."""

    def __init__(self, model, model_name: str, model_cfg: dict, preprocess: Preprocess,
                 aux_head=None, aux_classes: Sequence[str] = (), manifest: dict | None = None,
                 device: str = "cpu"):
        self.model = model
        self.model_name = model_name
        self.model_cfg = model_cfg
        self.preprocess = preprocess
        self.aux_head = aux_head  # torch.nn.Linear(embed_dim, len(aux_classes)) or None
        self.aux_classes = tuple(aux_classes)
        self.manifest = manifest or {}
        self.device = device
        self.tokenizer = Tokenizer(int(model_cfg["text_cfg"].get("context_length", 77)))
        self._hash: str | None = self.manifest.get("weights_sha256")
        self.load_warnings: list[str] = []  # library versions that differ from the ones that saved it
        # CNN towers run ~25% faster channels-last on CPU (oneDNN); ViTs gain nothing from it
        self.channels_last = "timm_model_name" in model_cfg.get("vision_cfg", {})
        if self.channels_last:
            import torch

            self.model.visual.to(memory_format=torch.channels_last)
        self.model.eval()

    # ------------------------------------------------------------ construction

    @classmethod
    def create(cls, model_name: str = "ecg-clip-cpu", device: str = "cpu", seed: int = 0,
               aux_classes: Sequence[str] = (), model_overrides: Mapping | None = None) -> "ECGEncoder":
        """A freshly initialised encoder from a repo model config (random weights, nothing downloaded).

        `model_overrides` deep-merges into the config (e.g. {"vision_cfg": {"image_size": [128, 176]}}).
        """
        import torch

        cfg = model_config(model_name)
        if model_overrides:
            cfg = _deep_merge(cfg, model_overrides)
        dev = resolve_device(device)
        torch.manual_seed(seed)
        model = build_model(cfg).to(dev)
        head = None
        if aux_classes:
            head = torch.nn.Linear(int(cfg["embed_dim"]), len(aux_classes)).to(dev)
        return cls(model, model_name, cfg, _preprocess_for(cfg), head, aux_classes, device=dev)

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the model input ((24, N) for the trace tower)."""
        shape = self.preprocess.input_shape
        return int(shape[0]), int(shape[1])

    @property
    def checkpoint_hash(self) -> str:
        """sha256 of the weights file as saved (computed from the weights if never saved)."""
        if self._hash is None:
            self._hash = hashlib.sha256(_safetensors_bytes(self.model.state_dict())).hexdigest()
        return self._hash

    def aux_logits(self, embeddings: "torch.Tensor") -> "torch.Tensor":
        """(n, d) L2-normalised image embeddings -> (n, len(aux_classes)) superclass logits.

        The head reads sqrt(d) * z (unit variance per dimension) so that logits of a useful size are
        reachable without huge weights; training and inference share this one definition.
        """
        if self.aux_head is None:
            raise RuntimeError(f"{self.model_name}: this encoder has no auxiliary superclass head")
        return self.aux_head(embeddings * math.sqrt(self.embed_dim))

    def mark_modified(self) -> None:
        """Weights changed (training): forget the cached hash."""
        self._hash = None

    def to(self, device: str) -> "ECGEncoder":
        self.device = resolve_device(device)
        self.model.to(self.device)
        if self.aux_head is not None:
            self.aux_head.to(self.device)
        return self

    # ------------------------------------------------------------ embedding

    def embed_images(self, images: Iterable["Image.Image"], batch_size: int = 32, strict: bool = True) -> np.ndarray:
        """PIL pages -> (n, embed_dim) float32, rows L2-normalised; streams an iterable in batches.

        `strict`: a picture the trace tower cannot read raises (see TracePreprocess); False embeds it as
        "nothing legible" (renders of library records, which are ECGs by construction)."""
        chunks, batch = [], []
        for img in images:
            batch.append(self.preprocess.pixels(img, strict=strict))
            if len(batch) == batch_size:
                chunks.append(self.embed_pixels(np.stack(batch)))
                batch = []
        if batch:
            chunks.append(self.embed_pixels(np.stack(batch)))
        return np.concatenate(chunks) if chunks else np.zeros((0, self.embed_dim), np.float32)

    def embed_pixels(self, pixels: "np.ndarray | torch.Tensor") -> np.ndarray:
        """(n, *preprocess.input_shape) arrays from `preprocess.pixels` (letterboxed pages, or digitised
        traces for the trace tower) -> (n, embed_dim) float32 L2-normalised."""
        import torch
        import torch.nn.functional as F

        x = torch.as_tensor(pixels)
        shape = self.preprocess.input_shape
        if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"embed_pixels: expected (n, {', '.join(map(str, shape))}) arrays from "
                             f"preprocess.pixels, got {tuple(x.shape)}")
        self.model.eval()
        with torch.inference_mode():
            feats = self.model.encode_image(self.model_input(x))
            return F.normalize(feats.float(), dim=-1).cpu().numpy().astype(np.float32)

    def model_input(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """(n, H, W, 3) uint8 -> (n, 3, H, W) normalised float32 on the encoder's device, in the memory
        format the image tower runs fastest in (training and embedding share this)."""
        import torch

        x = self.preprocess.normalize(pixels.to(self.device, non_blocking=True))
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def embed_texts(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        """Report texts -> (n, embed_dim) float32, rows L2-normalised."""
        import torch
        import torch.nn.functional as F

        texts = list(texts)
        out = []
        self.model.eval()
        with torch.inference_mode():
            for lo in range(0, len(texts), batch_size):
                tok = self.tokenizer(texts[lo:lo + batch_size]).to(self.device)
                out.append(F.normalize(self.model.encode_text(tok).float(), dim=-1).cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.embed_dim), np.float32)

    # ------------------------------------------------------------ save / load

    def save(self, directory: str | Path, *, training_data_hash: str | None = None,
             metrics: Mapping | None = None, training: Mapping | None = None) -> Path:
        """Write the checkpoint folder; each file atomically, the manifest last (it vouches for the rest)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        blob = _safetensors_bytes(self.model.state_dict())
        _atomic_write(d / WEIGHTS, blob)
        weights_sha = hashlib.sha256(blob).hexdigest()
        aux = None
        if self.aux_head is not None:
            ablob = _safetensors_bytes(self.aux_head.state_dict())
            _atomic_write(d / AUX_WEIGHTS, ablob)
            aux = {"file": AUX_WEIGHTS, "classes": list(self.aux_classes),
                   "sha256": hashlib.sha256(ablob).hexdigest()}
        elif (d / AUX_WEIGHTS).exists():
            (d / AUX_WEIGHTS).unlink()
        _atomic_write(d / OPEN_CLIP_CONFIG, _json_bytes(
            {"model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess.open_clip_cfg()}))
        manifest = {
            "format": FORMAT,
            "model_name": self.model_name,
            "model_cfg": self.model_cfg,
            "preprocess": self.preprocess.to_dict(),
            "text": {"tokenizer": "open_clip.SimpleTokenizer", "context_length": self.tokenizer.context_length,
                     "case_text": CASE_TEXT_VERSION},
            "embed_dim": self.embed_dim,
            "weights": WEIGHTS,
            "weights_sha256": weights_sha,
            "aux_head": aux,
            "training_data_hash": training_data_hash if training_data_hash is not None
            else self.manifest.get("training_data_hash"),
            "metrics": dict(metrics) if metrics is not None else self.manifest.get("metrics", {}),
            "training": dict(training) if training is not None else self.manifest.get("training", {}),
            "versions": current_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        _atomic_write(d / MANIFEST, _json_bytes(manifest))
        self.manifest, self._hash = manifest, weights_sha
        return d

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu", expected_hash: str | None = None,
             strict_versions: bool = False) -> "ECGEncoder":
        """Read a checkpoint folder, checking every file against its manifest.

        Raises EncoderLoadError naming the folder and what does not match (missing file, weights whose
        sha256 differs, config disagreement, unexpected tensors, a hash other than `expected_hash`).
        Library versions that differ from the ones that saved it are a warning (an error with
        `strict_versions`), listed in `encoder.load_warnings`.
        """
        import torch
        from safetensors.torch import load as st_load

        d = Path(directory)
        mpath = d / MANIFEST
        if not mpath.is_file():
            raise EncoderLoadError(f"{d}: not an encoder checkpoint (no {MANIFEST})")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EncoderLoadError(f"{mpath}: unreadable manifest ({exc})") from None
        if manifest.get("format") != FORMAT:
            raise EncoderLoadError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        for key in ("model_cfg", "weights_sha256", "preprocess"):
            if key not in manifest:
                raise EncoderLoadError(f"{mpath}: manifest lacks {key!r}")
        wpath = d / manifest.get("weights", WEIGHTS)
        if not wpath.is_file():
            raise EncoderLoadError(f"{d}: weights file {wpath.name} is missing")
        blob = wpath.read_bytes()
        sha = hashlib.sha256(blob).hexdigest()
        if sha != manifest["weights_sha256"]:
            raise EncoderLoadError(f"{wpath}: sha256 {sha[:12]}… does not match the manifest's "
                                   f"{manifest['weights_sha256'][:12]}… (interrupted save or replaced file)")
        if expected_hash is not None and sha != expected_hash:
            raise EncoderLoadError(f"{d}: encoder hash {sha[:12]}… is not the expected {expected_hash[:12]}… "
                                   "(built with another encoder checkpoint)")
        cfg = manifest["model_cfg"]
        ocpath = d / OPEN_CLIP_CONFIG
        if ocpath.is_file():
            oc = json.loads(ocpath.read_text(encoding="utf-8")).get("model_cfg")
            if oc != cfg:
                raise EncoderLoadError(f"{d}: {OPEN_CLIP_CONFIG} model_cfg differs from the manifest's "
                                       f"({_first_difference(cfg, oc)})")
        saved_pre = manifest["preprocess"]
        if saved_pre.get("kind") == "trace":
            pre = TracePreprocess(**saved_pre)
        else:
            pre = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved_pre.items()})
        expect_pre = _preprocess_for(cfg)
        if pre.input_shape != expect_pre.input_shape:
            raise EncoderLoadError(f"{d}: preprocess input {pre.input_shape} differs from the model's "
                                   f"{expect_pre.input_shape}")
        dev = resolve_device(device)
        model = build_model(cfg)
        state = st_load(blob)
        _load_state(model, state, str(wpath))
        model.to(dev)
        head, classes = None, ()
        aux = manifest.get("aux_head")
        if aux:
            apath = d / aux["file"]
            if not apath.is_file():
                raise EncoderLoadError(f"{d}: aux head file {aux['file']} is missing")
            ablob = apath.read_bytes()
            if hashlib.sha256(ablob).hexdigest() != aux.get("sha256"):
                raise EncoderLoadError(f"{apath}: sha256 does not match the manifest (interrupted save?)")
            classes = tuple(aux["classes"])
            head = torch.nn.Linear(int(cfg["embed_dim"]), len(classes))
            _load_state(head, st_load(ablob), str(apath))
            head.to(dev)
        enc = cls(model, manifest.get("model_name", "?"), cfg, pre, head, classes, manifest, dev)
        enc._hash = sha
        enc.load_warnings = version_mismatches(manifest.get("versions", {}))
        if enc.load_warnings:
            msg = f"{d}: saved with other library versions: " + "; ".join(enc.load_warnings)
            if strict_versions:
                raise EncoderLoadError(msg)
            warnings.warn(msg, stacklevel=2)
        return enc


# ---------------------------------------------------------------- helpers


def build_model(model_cfg: dict):
    """An open_clip CLIP from a config dict, random init; pretrained timm weights are never fetched."""
    import open_clip

    cfg = deepcopy(model_cfg)
    if cfg.pop("custom_text", False):
        raise ValueError("encoder configs with custom text towers are not supported (plain CLIP text tower)")
    trace = cfg.get("vision_cfg", {}).pop("trace_tower", None)
    if trace is not None:
        # open_clip builds the text tower, logit scale and the CLIP API; its image tower is then the
        # trace tower (a throwaway 1-layer ViT stands in during construction)
        cfg["vision_cfg"] = {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 32}
        model = open_clip.CLIP(**cfg)
        model.visual = TraceTower.build(int(cfg["embed_dim"]), tuple(trace.get("widths", (32, 64, 96, 128, 192))))
        return model
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        cfg["vision_cfg"]["timm_model_pretrained"] = False  # the library never downloads
    return open_clip.CLIP(**cfg)


def resolve_device(device: str | None) -> str:
    """'cpu' (default), 'cuda[:n]', or 'auto' (CUDA when available); asking for absent CUDA is an error."""
    import torch

    dev = (device or "cpu").strip().lower()
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r}: CUDA is not available on this machine (use 'cpu')")
    return dev


def current_versions() -> dict[str, str]:
    import open_clip
    import torch

    from rag_ecg import __version__

    out = {"torch": torch.__version__, "open_clip": open_clip.__version__, "rag_ecg": __version__,
           "python": platform.python_version(), "numpy": np.__version__}
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError:  # pragma: no cover - timm is a hard dependency of open_clip here
        pass
    return out


def version_mismatches(saved: Mapping[str, str]) -> list[str]:
    """'torch 2.14.1 -> 2.13.0' for each library whose version differs from the one that saved."""
    now = current_versions()
    return [f"{k} {v} -> {now[k]}" for k, v in sorted(saved.items()) if k in now and now[k] != v]


def _load_state(module, state: dict, what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} e.g. {', '.join(unexpected[:3])}")
        raise EncoderLoadError(f"{what}: weights do not fit the model config ({'; '.join(parts)})")


def _safetensors_bytes(state: Mapping[str, "torch.Tensor"]) -> bytes:
    """Deterministic safetensors bytes of a state dict (contiguous CPU copies, shared storage split)."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()})


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _deep_merge(base: dict, over: Mapping) -> dict:
    out = deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = deepcopy(v)
    return out


def _first_difference(a, b, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    return f"{path or 'value'}: {a!r} vs {b!r}"
