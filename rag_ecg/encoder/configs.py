"""Which encoders exist and how one is built: the repo's open_clip model configs, a random-init model, a device.

Configs are open_clip JSON files in `model_configs/` (registered with open_clip, so `open_clip.create_model`
knows them too). A config whose `vision_cfg` holds `trace_tower` gets our trace tower (`towers.TraceTower`)
as its image tower; any other builds open_clip's CLIP as is. Nothing is ever downloaded.
"""
from __future__ import annotations

from collections.abc import Mapping
from copy import deepcopy
from pathlib import Path

import open_clip
import torch

from rag_ecg.encoder.towers import TRACE_WIDTHS, TraceTower
from rag_ecg.errors import ConfigError, InputError

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
MODEL_NAMES = ("ecg-clip-tiny", "ecg-clip-cpu", "ecg-clip-trace", "ecg-clip-b16")

_registered = False


def register_model_configs() -> list[str]:
    """Make the repo's model configs (rag_ecg/encoder/model_configs/*.json) known to open_clip; idempotent."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def model_config(name: str) -> dict:
    """The open_clip model config (dict) of a registered name, e.g. 'ecg-clip-cpu'."""
    register_model_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"{name}: unknown encoder model config (known: {', '.join(register_model_configs())})")
    return cfg


def merge_config(base: dict, over: Mapping) -> dict:
    """`base` deep-updated by `over` (nested dicts merge, anything else replaces); neither is modified."""
    out = deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = merge_config(out[k], v)
        else:
            out[k] = deepcopy(v)
    return out


def build_model(model_cfg: dict) -> open_clip.CLIP:
    """An open_clip CLIP from a config dict, random init; pretrained timm weights are never fetched."""
    cfg = deepcopy(model_cfg)
    if cfg.pop("custom_text", False):
        raise ValueError("encoder configs with custom text towers are not supported (plain CLIP text tower)")
    trace = cfg.get("vision_cfg", {}).pop("trace_tower", None)
    if trace is not None:
        # open_clip builds the text tower, logit scale and the CLIP API; its image tower is then the
        # trace tower (a throwaway 1-layer ViT stands in during construction)
        cfg["vision_cfg"] = {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 32}
        model = open_clip.CLIP(**cfg)
        model.visual = TraceTower(int(cfg["embed_dim"]), tuple(trace.get("widths", TRACE_WIDTHS)))
        return model
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        cfg["vision_cfg"]["timm_model_pretrained"] = False  # the library never downloads
    return open_clip.CLIP(**cfg)


def resolve_device(device: str | None) -> str:
    """'cpu' (default), 'cuda[:n]', or 'auto' (CUDA when available); asking for absent CUDA is an error."""
    dev = (device or "cpu").strip().lower()
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device!r}: CUDA is not available on this machine (use 'cpu')")
    return dev
