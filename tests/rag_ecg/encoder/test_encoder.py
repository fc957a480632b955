"""The ECG encoder: configs, case text, letterboxing, embeddings, save/load round trip and its checks."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from rag_ecg.encoder.checkpoint import MANIFEST, OPEN_CLIP_CONFIG, WEIGHTS, EncoderLoadError
from rag_ecg.encoder.configs import MODEL_NAMES, model_config, register_model_configs
from rag_ecg.encoder.model import ECGEncoder
from rag_ecg.encoder.preprocess import Preprocess
from rag_ecg.paper.digitize import DigitizeError
from rag_ecg.encoder.text import case_text
from rag_ecg.errors import InputError
from rag_ecg.io import versions


@pytest.fixture(scope="module")
def pages(ptbxl_dir):
    """Three real PTB-XL records drawn as paper ECGs (one clean, one photo, one random)."""
    from rag_ecg.data.records import ptbxl_record, read_ptbxl_index
    from rag_ecg.paper.render import render_page

    rows, _ = read_ptbxl_index(ptbxl_dir)
    recs = [ptbxl_record(r) for r in rows[:3]]
    return [render_page(rec, preset=p, seed=i, dpi=60) for i, (rec, p) in
            enumerate(zip(recs, ["clean", "photo", "random"]))], recs


@pytest.fixture(scope="module")
def tiny():
    return ECGEncoder.create("ecg-clip-tiny", seed=0, aux_classes=("NORM", "MI", "STTC", "CD", "HYP"))


def test_repo_model_configs_are_registered_and_landscape():
    names = register_model_configs()
    assert set(MODEL_NAMES) <= set(names)
    for name in MODEL_NAMES:
        cfg = model_config(name)
        if "trace_tower" in cfg["vision_cfg"]:  # reads digitised traces, not pixels (tests/test_digitize.py)
            assert cfg["vision_cfg"]["trace_tower"]["n_samples"] == 1000
            continue
        h, w = cfg["vision_cfg"]["image_size"]
        assert 1.2 <= w / h <= 1.5, f"{name}: input should be landscape like an ECG page"
        if "patch_size" in cfg["vision_cfg"]:
            assert h % cfg["vision_cfg"]["patch_size"] == 0 and w % cfg["vision_cfg"]["patch_size"] == 0
        else:
            assert h % 32 == 0 and w % 32 == 0  # CNN towers downsample by 32
            assert cfg["vision_cfg"]["timm_model_pretrained"] is False
    with pytest.raises(ValueError, match="no-such-model: unknown encoder model config"):
        model_config("no-such-model")


def test_case_text_puts_english_code_descriptions_first():
    desc = {"NORM": "normal ECG", "SR": "sinus rhythm", "IMI": "inferior myocardial infarction"}
    text = case_text("sinusrhythmus  normales ekg", {"SR": 0.0, "NORM": 100.0}, desc)
    assert text == "normal ECG; sinus rhythm. sinusrhythmus normales ekg"
    assert case_text("", {"IMI": 50.0, "XYZ": 80.0}, desc) == "XYZ; inferior myocardial infarction"
    assert case_text("Sinus rhythm. Normal axis.", {}, desc) == "Sinus rhythm. Normal axis."
    assert case_text("x", {"NORM": 100, "SR": 0}, {"NORM": "normal", "SR": "Normal"}) == "normal. x"


def test_letterbox_keeps_the_page_aspect_on_white_paper():
    pre = Preprocess(height=64, width=96)
    page = Image.new("RGB", (1100, 850), (0, 0, 0))  # letter landscape, all ink
    px = pre.pixels(page, strict=False)  # geometry only: a user's all-black picture is refused (next test)
    assert px.shape == (64, 96, 3) and px.dtype == np.uint8
    ink_cols = np.flatnonzero((px < 128).all(axis=(0, 2)))
    # 1100x850 scaled by 64/850 -> 83 px wide, centred: 6 white columns left, 7 right
    assert ink_cols.size == 83 and ink_cols[0] == 6
    assert (px[:, :6] == 255).all() and (px[:, -7:] == 255).all()
    # a portrait photo is letterboxed too, never cropped
    tall = pre.pixels(Image.new("L", (300, 600), 0), strict=False)
    assert (tall < 128).all(axis=(1, 2)).sum() == 0 and (tall < 128).any()
    # deterministic, and normalisation maps white to +1
    assert np.array_equal(pre.pixels(page, strict=False), px)
    x = pre.normalize(torch.from_numpy(px)[None])[0]
    assert tuple(x.shape) == (3, 64, 96) and float(x.max()) == pytest.approx(1.0)


def test_an_image_tower_refuses_a_users_picture_with_no_ecg_traces(pages):
    """The image tower would embed anything; the digitiser's trace-row check is its not-an-ECG gate too."""
    pre = Preprocess(height=64, width=96)
    assert pre.pixels(pages[0][0]).shape == (64, 96, 3)  # a real page passes
    for picture in (Image.new("RGB", (1100, 850), "white"), Image.new("L", (300, 600), 0)):
        with pytest.raises(DigitizeError, match="no readable ECG traces"):
            pre.pixels(picture)
        assert pre.pixels(picture, strict=False).shape == (64, 96, 3)  # library renders and training pages


def test_embeddings_are_normalised_float32_and_batch_independent(tiny, pages):
    imgs, recs = pages
    a = tiny.embed_images(imgs, batch_size=2)
    b = tiny.embed_images(iter(imgs), batch_size=5)
    assert a.shape == (3, tiny.embed_dim) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.allclose(a, b, atol=1e-5)
    t = tiny.embed_texts([r.report for r in recs] + ["normal ECG"], batch_size=2)
    assert t.shape == (4, tiny.embed_dim) and t.dtype == np.float32
    assert np.allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    assert tiny.embed_images([]).shape == (0, tiny.embed_dim)


def test_save_load_round_trip_gives_identical_embeddings(tiny, pages, tmp_path):
    imgs, recs = pages
    texts = [r.report for r in recs]
    d = tiny.save(tmp_path / "enc", training_data_hash="abc", metrics={"random/auc": 0.5})
    assert tiny.checkpoint_hash == hashlib.sha256((d / WEIGHTS).read_bytes()).hexdigest()
    m = json.loads((d / MANIFEST).read_text())
    assert m["model_name"] == "ecg-clip-tiny" and m["training_data_hash"] == "abc"
    assert m["metrics"] == {"random/auc": 0.5} and m["preprocess"]["height"] == 64
    assert {"torch", "open_clip", "rag_ecg"} <= set(m["versions"]) and m["created"]
    loaded = ECGEncoder.load(d)
    assert loaded.checkpoint_hash == tiny.checkpoint_hash and loaded.load_warnings == []
    assert np.array_equal(loaded.embed_images(imgs), tiny.embed_images(imgs))
    assert np.array_equal(loaded.embed_texts(texts), tiny.embed_texts(texts))
    assert loaded.aux_classes == tiny.aux_classes
    # open_clip itself can read the folder too (no pickle anywhere)
    import open_clip
    oc = open_clip.create_model(f"local-dir:{d}")
    assert set(oc.state_dict()) == set(tiny.model.state_dict())


def test_load_says_what_does_not_match(tiny, tmp_path):
    d = tiny.save(tmp_path / "enc")
    with pytest.raises(EncoderLoadError, match="is not the expected"):
        ECGEncoder.load(d, expected_hash="0" * 64)
    cfg = json.loads((d / OPEN_CLIP_CONFIG).read_text())
    cfg["model_cfg"]["embed_dim"] = 16
    (d / OPEN_CLIP_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(EncoderLoadError, match="embed_dim: 32 vs 16"):
        ECGEncoder.load(d)
    d2 = tiny.save(tmp_path / "enc2")
    blob = bytearray((d2 / WEIGHTS).read_bytes())
    blob[-1] ^= 0xFF
    (d2 / WEIGHTS).write_bytes(bytes(blob))
    with pytest.raises(EncoderLoadError, match="does not match the manifest"):
        ECGEncoder.load(d2)
    with pytest.raises(EncoderLoadError, match="not an encoder checkpoint"):
        ECGEncoder.load(tmp_path)
    m = json.loads((d2 / MANIFEST).read_text())
    m["versions"]["torch"] = "0.0.1"
    (d2 / MANIFEST).write_text(json.dumps(m))
    tiny.save(tmp_path / "enc3")
    m3 = json.loads((tmp_path / "enc3" / MANIFEST).read_text())
    m3["versions"]["torch"] = "0.0.1"
    (tmp_path / "enc3" / MANIFEST).write_text(json.dumps(m3))
    with pytest.warns(UserWarning, match="torch 0.0.1 ->"):
        enc = ECGEncoder.load(tmp_path / "enc3")
    assert enc.load_warnings and enc.load_warnings[0].startswith("torch 0.0.1")
    with pytest.raises(EncoderLoadError, match="other library versions"):
        ECGEncoder.load(tmp_path / "enc3", strict_versions=True)
    # older manifests recorded torch.__version__ with its local build label ('2.14.1+cu130'): same version
    m3["versions"]["torch"] = versions()["torch"].split("+")[0] + "+cu999"
    (tmp_path / "enc3" / MANIFEST).write_text(json.dumps(m3))
    assert ECGEncoder.load(tmp_path / "enc3", strict_versions=True).load_warnings == []


def test_cpu_config_builds_at_its_landscape_geometry():
    enc = ECGEncoder.create("ecg-clip-cpu")
    assert enc.image_size == (256, 352)
    emb = enc.embed_images([Image.new("RGB", (1100, 850), "white")], strict=False)
    assert emb.shape == (1, enc.embed_dim)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a host without CUDA; this host has it "
                    "(test_cuda_encoder_embeds_on_the_gpu runs instead)")
def test_asking_for_cuda_without_a_gpu_is_a_one_line_input_error():
    with pytest.raises(InputError, match="device 'cuda': CUDA is not available on this machine"):
        ECGEncoder.create("ecg-clip-tiny", device="cuda")
    assert ECGEncoder.create("ecg-clip-tiny", device="auto").device == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the no-GPU side is "
                    "test_asking_for_cuda_without_a_gpu_is_a_one_line_input_error)")
def test_cuda_encoder_embeds_on_the_gpu(pages):
    gpu = ECGEncoder.create("ecg-clip-tiny", device="cuda", seed=0)
    cpu = ECGEncoder.create("ecg-clip-tiny", device="cpu", seed=0)
    assert gpu.device == "cuda" and {p.device.type for p in gpu.model.parameters()} == {"cuda"}
    a, b = gpu.embed_images(pages[0], strict=False), cpu.embed_images(pages[0], strict=False)
    assert a.shape == b.shape == (3, gpu.embed_dim) and a.dtype == np.float32
    # same weights, same pages: the same unit vectors up to GPU rounding (TF32 convolutions)
    assert np.all((a * b).sum(axis=1) > 0.999), (a * b).sum(axis=1)


def test_trace_tower_lock_and_grad_checkpointing_follow_open_clip_hooks():
    """`lock_image_tower` freezes all but the last groups (and batch-norm statistics when asked);
    gradient checkpointing changes memory, not results."""
    import torch

    enc = ECGEncoder.create("ecg-clip-trace", seed=0)
    tower = enc.model.visual
    x = torch.randn(3, 24, 1000)
    tower.train()
    ref = tower(x)
    ref.sum().backward()
    grads = [p.grad.clone() for p in tower.parameters()]
    tower.zero_grad()
    tower.set_grad_checkpointing(True)
    out = tower(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for p, g in zip(tower.parameters(), grads):
        torch.testing.assert_close(p.grad, g)

    enc.model.lock_image_tower(unlocked_groups=1, freeze_bn_stats=True)
    assert all(not p.requires_grad for p in tower.features.parameters())
    assert all(p.requires_grad for p in tower.proj.parameters())
    enc.model.train()
    norms = [m for m in tower.features.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert norms and all(not m.training for m in norms)
    before = norms[0].running_mean.clone()
    tower(x)
    torch.testing.assert_close(norms[0].running_mean, before)
