"""The CLIP-style ECG dual encoder: pages (or their digitised traces) and report text into one embedding space.

`ECGEncoder` joins the parts: an open_clip model built from a repo config (`configs`), the page preprocessing
(`preprocess`), the tokenizer (`text`) and checkpoint folders (`checkpoint`). Embeddings are L2-normalised
float32 rows, the form the FAISS index (`rag_ecg.search.vector_index`) expects.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rag_ecg.encoder.checkpoint import load_checkpoint, save_checkpoint, weights_hash
from rag_ecg.encoder.configs import build_model, merge_config, model_config, resolve_device
from rag_ecg.encoder.preprocess import Preprocess, TracePreprocess, preprocess_for
from rag_ecg.encoder.text import Tokenizer


class ECGEncoder:
    """A CLIP dual encoder over ECG pages and report text; embeddings are L2-normalised float32."""

    def __init__(self, model, model_name: str, model_cfg: dict, preprocess: Preprocess | TracePreprocess,
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
            self.model.visual.to(memory_format=torch.channels_last)
        self.model.eval()

    # ------------------------------------------------------------ construction

    @classmethod
    def create(cls, model_name: str = "ecg-clip-cpu", device: str = "cpu", seed: int = 0,
               aux_classes: Sequence[str] = (), model_overrides: Mapping | None = None) -> "ECGEncoder":
        """A freshly initialised encoder from a repo model config (random weights, nothing downloaded).

        `model_overrides` deep-merges into the config (e.g. {"vision_cfg": {"image_size": [128, 176]}}).
        """
        cfg = model_config(model_name)
        if model_overrides:
            cfg = merge_config(cfg, model_overrides)
        dev = resolve_device(device)
        torch.manual_seed(seed)
        model = build_model(cfg).to(dev)
        head = None
        if aux_classes:
            head = torch.nn.Linear(int(cfg["embed_dim"]), len(aux_classes)).to(dev)
        return cls(model, model_name, cfg, preprocess_for(cfg), head, aux_classes, device=dev)

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
            self._hash = weights_hash(self.model.state_dict())
        return self._hash

    def aux_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
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

    def embed_images(self, images: Iterable[Image.Image], batch_size: int = 32, strict: bool = True) -> np.ndarray:
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

    def embed_pixels(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """(n, *preprocess.input_shape) arrays from `preprocess.pixels` (letterboxed pages, or digitised
        traces for the trace tower) -> (n, embed_dim) float32 L2-normalised."""
        x = torch.as_tensor(pixels)
        shape = self.preprocess.input_shape
        if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"embed_pixels: expected (n, {', '.join(map(str, shape))}) arrays from "
                             f"preprocess.pixels, got {tuple(x.shape)}")
        self.model.eval()
        with torch.inference_mode():
            feats = self.model.encode_image(self.model_input(x))
            return F.normalize(feats.float(), dim=-1).cpu().numpy().astype(np.float32)

    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, H, W, 3) uint8 -> (n, 3, H, W) normalised float32 on the encoder's device, in the memory
        format the image tower runs fastest in (training and embedding share this)."""
        x = self.preprocess.normalize(pixels.to(self.device, non_blocking=True))
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def embed_texts(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        """Report texts -> (n, embed_dim) float32, rows L2-normalised."""
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
        """Write the checkpoint folder (see `checkpoint`); unset fields keep what this encoder's manifest says."""
        manifest = save_checkpoint(
            directory, model=self.model, model_name=self.model_name, model_cfg=self.model_cfg,
            preprocess=self.preprocess, context_length=self.tokenizer.context_length, aux_head=self.aux_head,
            aux_classes=self.aux_classes,
            training_data_hash=training_data_hash if training_data_hash is not None
            else self.manifest.get("training_data_hash"),
            metrics=metrics if metrics is not None else self.manifest.get("metrics", {}),
            training=training if training is not None else self.manifest.get("training", {}))
        self.manifest, self._hash = manifest, manifest["weights_sha256"]
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu", expected_hash: str | None = None,
             strict_versions: bool = False) -> "ECGEncoder":
        """Read a checkpoint folder, checking every file against its manifest (`checkpoint.load_checkpoint`:
        EncoderLoadError names what does not match; other library versions warn, or raise when strict)."""
        ck = load_checkpoint(directory, device, expected_hash, strict_versions)
        enc = cls(ck.model, ck.model_name, ck.model_cfg, ck.preprocess, ck.aux_head, ck.aux_classes, ck.manifest,
                  ck.device)
        enc._hash = ck.weights_sha256
        enc.load_warnings = ck.version_warnings
        return enc
