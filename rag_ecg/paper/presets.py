"""Presets: the artifact sequences that turn a clean page into a print, a scan, a phone photo, or any of them.

Each preset is a list of steps (artifact, probability, strength range) applied in order; the steps a seed
picks are reproducible (`preset_steps`), so the same (page, preset, seed) always gives the same pixels.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from rag_ecg.errors import InputError
from rag_ecg.paper.artifacts import apply_artifact_array, artifact_rng, to_rgb_array

PRESETS = ("clean", "print", "scan", "photo", "random")

# ---------------------------------------------------------------- presets

# Each step: (artifact, probability it happens, strength low, strength high), applied in order: marks on the
# paper, then the paper's shape, then the capture (geometry, light, colour, optics, sensor, file).
_STEPS: dict[str, list[tuple[str, float, float, float]]] = {
    "clean": [],
    "print": [
        ("color_shift", 0.8, 0.1, 0.5),
        ("defocus_blur", 0.6, 0.05, 0.25),
        ("gaussian_noise", 0.8, 0.05, 0.25),
        ("jpeg", 0.5, 0.0, 0.3),
    ],
    "scan": [
        ("text_stamps", 0.35, 0.2, 0.8),
        ("creases", 0.3, 0.2, 0.7),
        ("rotate", 0.9, 0.05, 0.4),
        ("crop_pad", 0.5, 0.05, 0.4),
        ("photocopy", 0.4, 0.3, 0.9),
        ("color_shift", 0.5, 0.1, 0.5),
        ("defocus_blur", 0.5, 0.05, 0.3),
        ("gaussian_noise", 0.7, 0.05, 0.35),
        ("salt_pepper", 0.3, 0.05, 0.3),
        ("jpeg", 0.7, 0.2, 0.6),
    ],
    "photo": [
        ("text_stamps", 0.2, 0.2, 0.8),
        ("creases", 0.4, 0.3, 1.0),
        ("wrinkles", 0.6, 0.2, 0.8),
        ("perspective", 1.0, 0.3, 1.0),
        ("rotate", 0.5, 0.1, 0.6),
        ("lighting", 1.0, 0.4, 1.0),
        ("color_shift", 0.8, 0.3, 0.9),
        ("defocus_blur", 0.5, 0.1, 0.6),
        ("motion_blur", 0.3, 0.1, 0.6),
        ("gaussian_noise", 0.9, 0.15, 0.6),
        ("jpeg", 0.9, 0.3, 0.8),
    ],
}
_RANDOM_BASE = {"clean": 0.1, "print": 0.2, "scan": 0.3, "photo": 0.4}


def preset_steps(preset: str, seed: int = 0) -> list[tuple[str, float, int]]:
    """The (artifact, strength, seed) steps a preset applies for this seed (what `apply_preset` runs)."""
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    rng = artifact_rng(seed, 0x9E5)
    spread = 1.0
    if preset == "random":
        names, p = list(_RANDOM_BASE), np.array(list(_RANDOM_BASE.values()))
        preset = names[int(rng.choice(len(names), p=p / p.sum()))]
        spread = float(rng.uniform(0.5, 1.3))  # random pages range from milder to harsher than the base
    steps = []
    for name, prob, lo, hi in _STEPS[preset]:
        if rng.random() < prob:
            strength = float(np.clip(rng.uniform(lo, hi) * spread, 0.0, 1.0))
            steps.append((name, strength, int(rng.integers(0, 2**31 - 1))))
    return steps


def apply_preset_array(arr: np.ndarray, preset: str, seed: int = 0) -> np.ndarray:
    """`apply_preset` on an (H, W, 3) uint8 RGB array (the renderer's fast path); returns a new array or `arr`."""
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise InputError(f"artifacts expect an (H, W, 3) uint8 RGB array, got {arr.dtype} {arr.shape}")
    for name, strength, step_seed in preset_steps(preset, seed):
        if strength > 0:
            arr = apply_artifact_array(arr, name, strength, step_seed)
    return arr


def apply_preset(image: Image.Image, preset: str, seed: int = 0) -> Image.Image:
    """Apply a named preset (clean|print|scan|photo|random); same size out; "clean" returns the image as is."""
    steps = preset_steps(preset, seed)
    if not steps:
        return image if image.mode == "RGB" else image.convert("RGB")
    return Image.fromarray(apply_preset_array(to_rgb_array(image), preset, seed), "RGB")
