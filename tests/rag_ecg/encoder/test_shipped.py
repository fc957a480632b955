"""The shipped encoder: compact form <-> checkpoint folder, and the one this checkout ships."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load

from rag_ecg.data.labels import SUPERCLASSES
from rag_ecg.encoder.checkpoint import EncoderLoadError
from rag_ecg.encoder.model import ECGEncoder
from rag_ecg.encoder.shipped import SHIPPED_DIR, SHIPPED_MANIFEST, SHIPPED_WEIGHTS, compact, default_encoder, expand

TEXTS = ["sinus rhythm; normal ECG", "inferior myocardial infarction", "left bundle branch block"]


def _trained_like(tmp_path):
    enc = ECGEncoder.create("ecg-clip-tiny", seed=3, aux_classes=SUPERCLASSES)
    with torch.no_grad():  # a trained token table is not the random init: give the kept rows distinct values
        enc.model.token_embedding.weight.mul_(3.0)
    enc.save(tmp_path / "ck", training_data_hash="abc123")
    return ECGEncoder.load(tmp_path / "ck")


def test_compact_then_expand_gives_the_same_encoder_on_the_texts_it_kept(tmp_path):
    enc = _trained_like(tmp_path)
    tokens = set(torch.unique(enc.tokenizer(TEXTS)).tolist())
    compact(tmp_path / "ck", tokens, tmp_path / "ship", {"command": "python cli.py train-encoder"})
    size = (tmp_path / "ship" / SHIPPED_WEIGHTS).stat().st_size
    assert size < 0.6 * (tmp_path / "ck" / "open_clip_model.safetensors").stat().st_size
    back = ECGEncoder.load(expand(tmp_path / "ship", tmp_path / "expanded"))
    np.testing.assert_allclose(back.embed_texts(TEXTS), enc.embed_texts(TEXTS), atol=5e-3)
    pages = np.random.default_rng(0).integers(0, 255, (2, *enc.preprocess.input_shape), dtype=np.uint8)
    np.testing.assert_allclose(back.embed_pixels(pages), enc.embed_pixels(pages), atol=5e-3)
    assert back.aux_classes == tuple(SUPERCLASSES)
    # rows no kept text uses are zero; the manifest says what it was trained on and how to make it again
    table = back.model.token_embedding.weight.detach()
    unused = sorted(set(range(table.shape[0])) - tokens)[:50]
    assert torch.all(table[unused] == 0) and torch.all(table[sorted(tokens)].abs().sum(1) > 0)
    assert back.manifest["training_data_hash"] == "abc123"
    assert back.manifest["shipped"]["recipe"]["command"] == "python cli.py train-encoder"


def test_expansion_is_byte_identical_everywhere(tmp_path):
    _trained_like(tmp_path)
    compact(tmp_path / "ck", range(300), tmp_path / "ship", {})
    a = ECGEncoder.load(expand(tmp_path / "ship", tmp_path / "a"))
    b = ECGEncoder.load(expand(tmp_path / "ship", tmp_path / "b"))
    assert a.checkpoint_hash == b.checkpoint_hash  # every index built from it records the same encoder


def test_a_damaged_shipped_file_is_refused(tmp_path):
    _trained_like(tmp_path)
    compact(tmp_path / "ck", range(300), tmp_path / "ship", {})
    blob = bytearray((tmp_path / "ship" / SHIPPED_WEIGHTS).read_bytes())
    blob[-10] ^= 0xFF
    (tmp_path / "ship" / SHIPPED_WEIGHTS).write_bytes(bytes(blob))
    with pytest.raises(EncoderLoadError, match="damaged install"):
        expand(tmp_path / "ship", tmp_path / "x")
    with pytest.raises(EncoderLoadError, match="no shipped encoder"):
        default_encoder(tmp_path / "nowhere")


def test_the_checkout_ships_a_small_reproducible_encoder(tmp_path, monkeypatch):
    info = json.loads((SHIPPED_DIR / SHIPPED_MANIFEST).read_text())
    assert (SHIPPED_DIR / SHIPPED_WEIGHTS).stat().st_size < 8_000_000  # a few MB, in the repository
    assert info["recipe"]["command"].startswith("python cli.py train-encoder")
    assert info["recipe"]["training_data_hash"] and info["recipe"]["config"]["model"] == "ecg-clip-trace"
    monkeypatch.setenv("RAG_ECG_HOME", str(tmp_path))
    enc = ECGEncoder.load(default_encoder())
    assert enc.preprocess.kind == "trace" and enc.aux_classes == tuple(SUPERCLASSES)
    assert default_encoder() == default_encoder()  # expanded once, then reused
    assert set(st_load((SHIPPED_DIR / SHIPPED_WEIGHTS).read_bytes())) >= {"token_embedding.weight.rows"}
