"""Encoder checkpoint folders: write them atomically, read them back checking every file against the manifest.

A checkpoint is a folder: `open_clip_model.safetensors` (the CLIP weights; their sha256 is the encoder's
`checkpoint_hash`, which every built index records), `open_clip_config.json` (so
`open_clip.create_model("local-dir:<folder>")` also reads it), optional `aux_head.safetensors` (a superclass
head used in training), and `manifest.json` (config, preprocessing, training-data hash, metrics, versions,
created time), written last because it vouches for the rest. Never pickle. The bytes written for given weights
never change (indexes check the hash): safetensors of contiguous CPU copies, JSON with sorted keys.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from rag_ecg.encoder.configs import build_model, resolve_device
from rag_ecg.encoder.preprocess import Preprocess, TracePreprocess, preprocess_for, preprocess_from_dict
from rag_ecg.encoder.text import CASE_TEXT_VERSION
from rag_ecg.errors import ArtifactError
from rag_ecg.io import atomic_write, json_text, version_mismatches, versions

FORMAT = "rag-ecg-encoder/1"
MANIFEST = "manifest.json"
WEIGHTS = "open_clip_model.safetensors"
AUX_WEIGHTS = "aux_head.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"


class EncoderLoadError(ArtifactError):
    """A checkpoint folder that cannot be used; the message names the folder and what does not match."""


@dataclass
class Checkpoint:
    """What `load_checkpoint` read: a model with its weights on `device`, and what the manifest says of it."""

    model: nn.Module  # open_clip CLIP
    model_name: str
    model_cfg: dict
    preprocess: Preprocess | TracePreprocess
    aux_head: nn.Linear | None
    aux_classes: tuple[str, ...]
    manifest: dict
    device: str
    weights_sha256: str
    version_warnings: list[str] = field(default_factory=list)  # libraries whose version differs from the saver's


def weights_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """Deterministic safetensors bytes of a state dict (contiguous CPU copies, shared storage split)."""
    return st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()})


def weights_hash(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of `weights_bytes(state)`: what the weights file of these weights will hash to."""
    return hashlib.sha256(weights_bytes(state)).hexdigest()


def _json(obj: Any) -> str:
    return json_text(obj, indent=2, sort_keys=True)


def save_checkpoint(directory: str | Path, *, model: nn.Module, model_name: str, model_cfg: dict,
                    preprocess: Preprocess | TracePreprocess, context_length: int, aux_head: nn.Module | None,
                    aux_classes: Sequence[str], training_data_hash: str | None, metrics: Mapping,
                    training: Mapping) -> dict:
    """Write the checkpoint folder; each file atomically, the manifest last. Returns the manifest written."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    blob = weights_bytes(model.state_dict())
    atomic_write(d / WEIGHTS, blob)
    aux = None
    if aux_head is not None:
        ablob = weights_bytes(aux_head.state_dict())
        atomic_write(d / AUX_WEIGHTS, ablob)
        aux = {"file": AUX_WEIGHTS, "classes": list(aux_classes), "sha256": hashlib.sha256(ablob).hexdigest()}
    elif (d / AUX_WEIGHTS).exists():
        (d / AUX_WEIGHTS).unlink()
    atomic_write(d / OPEN_CLIP_CONFIG, _json({"model_cfg": model_cfg, "preprocess_cfg": preprocess.open_clip_cfg()}))
    manifest = {
        "format": FORMAT,
        "model_name": model_name,
        "model_cfg": model_cfg,
        "preprocess": preprocess.to_dict(),
        "text": {"tokenizer": "open_clip.SimpleTokenizer", "context_length": context_length,
                 "case_text": CASE_TEXT_VERSION},
        "embed_dim": int(model_cfg["embed_dim"]),
        "weights": WEIGHTS,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "aux_head": aux,
        "training_data_hash": training_data_hash,
        "metrics": dict(metrics),
        "training": dict(training),
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write(d / MANIFEST, _json(manifest))
    return manifest


def load_checkpoint(directory: str | Path, device: str = "cpu", expected_hash: str | None = None,
                    strict_versions: bool = False) -> Checkpoint:
    """Read a checkpoint folder, checking every file against its manifest.

    Raises EncoderLoadError naming the folder and what does not match (missing file, weights whose
    sha256 differs, config disagreement, unexpected tensors, a hash other than `expected_hash`).
    Library versions that differ from the ones that saved it are a warning (an error with
    `strict_versions`), listed in `version_warnings`.
    """
    d = Path(directory)
    manifest = _read_manifest(d)
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
    pre = preprocess_from_dict(manifest["preprocess"])
    expect_pre = preprocess_for(cfg)
    if pre.input_shape != expect_pre.input_shape:
        raise EncoderLoadError(f"{d}: preprocess input {pre.input_shape} differs from the model's "
                               f"{expect_pre.input_shape}")
    dev = resolve_device(device)
    model = build_model(cfg)
    _load_state(model, st_load(blob), str(wpath))
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
        head = nn.Linear(int(cfg["embed_dim"]), len(classes))
        _load_state(head, st_load(ablob), str(apath))
        head.to(dev)
    mismatches = version_mismatches(manifest.get("versions", {}))
    if mismatches:
        msg = f"{d}: saved with other library versions: " + "; ".join(mismatches)
        if strict_versions:
            raise EncoderLoadError(msg)
        warnings.warn(msg, stacklevel=3)  # points at the caller of ECGEncoder.load
    return Checkpoint(model, manifest.get("model_name", "?"), cfg, pre, head, classes, manifest, dev, sha,
                      mismatches)


def _read_manifest(d: Path) -> dict:
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
    return manifest


def _load_state(module: nn.Module, state: dict, what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} e.g. {', '.join(unexpected[:3])}")
        raise EncoderLoadError(f"{what}: weights do not fit the model config ({'; '.join(parts)})")


def _first_difference(a, b, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    return f"{path or 'value'}: {a!r} vs {b!r}"
