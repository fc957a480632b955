"""Artifacts: each changes a real rendered page, keeps the size contract, and is deterministic from its seed."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rag_ecg.paper.artifacts import ARTIFACTS, apply_artifact
from rag_ecg.paper.layout import RenderConfig
from rag_ecg.paper.presets import PRESETS, apply_preset, preset_steps
from rag_ecg.paper.render import render_record


@pytest.fixture(scope="module")
def page(ptb) -> Image.Image:
    return render_record(ptb, RenderConfig(dpi=80)).image


def _diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


@pytest.mark.parametrize("name", sorted(ARTIFACTS))
def test_artifact_changes_page_keeps_size_and_is_deterministic(page, name):
    fn = ARTIFACTS[name]
    out = fn(page, 0.8, 3)
    assert out.size == page.size and out.mode == "RGB"
    assert _diff(out, page) > 0.05, f"{name} did not change the page"
    assert out.tobytes() == fn(page, 0.8, 3).tobytes()
    assert len({hash(fn(page, 0.8, s).tobytes()) for s in range(4, 8)} | {hash(out.tobytes())}) > 1  # seed matters
    assert np.array_equal(np.asarray(fn(page, 0.0, 3)), np.asarray(page))  # strength 0: unchanged


@pytest.mark.parametrize("name", sorted(ARTIFACTS))
def test_size_contract_on_odd_sizes_and_modes(name):
    rng = np.random.default_rng(0)
    arr = np.full((217, 301, 3), 245, np.uint8)
    arr[100:104, :] = 0
    arr[:, 150:152] = 30
    arr[rng.integers(0, 217, 500), rng.integers(0, 301, 500)] = 0
    for img in (Image.fromarray(arr), Image.fromarray(arr).convert("L"), Image.fromarray(arr).convert("RGBA")):
        out = ARTIFACTS[name](img, 1.0, 7)
        assert out.size == (301, 217) and out.mode == "RGB"


def test_stronger_means_more_change(page):
    for name in ("gaussian_noise", "defocus_blur", "rotate", "perspective", "jpeg", "lighting"):
        weak, strong = _diff(ARTIFACTS[name](page, 0.2, 1), page), _diff(ARTIFACTS[name](page, 1.0, 1), page)
        assert strong > weak, name


def test_photocopy_is_grey_and_drops_faint_grid(page):
    out = np.asarray(ARTIFACTS["photocopy"](page, 1.0, 0))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    before = np.asarray(page.convert("L"))
    faint = (before > 200) & (before < 250)  # minor grid ink
    assert out[..., 0][faint].mean() > before[faint].mean() + 5


def test_geometric_artifacts_fill_uncovered_corners_with_background(page):
    out = np.asarray(ARTIFACTS["perspective"](page, 1.0, 5))
    corner = out[:3, :3].reshape(-1, 3)
    assert (corner == corner[0]).all()  # one flat background colour where the page moved away


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_keep_size_and_are_deterministic(page, preset):
    a, b = apply_preset(page, preset, seed=9), apply_preset(page, preset, seed=9)
    assert a.size == page.size and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    if preset == "clean":
        assert a.tobytes() == page.tobytes()


def test_preset_steps_follow_their_recipe():
    for seed in range(20):
        names = [n for n, _, _ in preset_steps("photo", seed)]
        assert "perspective" in names and "lighting" in names
        assert all(0 < s <= 1 for _, s, _ in preset_steps("random", seed))
    assert preset_steps("clean", 0) == []
    bases = {tuple(n for n, _, _ in preset_steps("random", s)) for s in range(30)}
    assert len(bases) > 10  # random mixes many different recipes


def test_bad_arguments_are_named():
    img = Image.new("RGB", (40, 30), "white")
    with pytest.raises(ValueError, match="unknown preset 'fax'"):
        apply_preset(img, "fax")
    with pytest.raises(ValueError, match=r"strength 1.5 is outside \[0, 1\]"):
        apply_artifact(img, "jpeg", 1.5)
    with pytest.raises(ValueError, match="unknown artifact 'smudge'"):
        apply_artifact(img, "smudge", 0.5)
