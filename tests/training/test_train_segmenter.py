"""The segmenter recipe: configs load and bad ones fail in one line; the loss falls on real labelled pages;
a tiny run trains, logs, resumes and exports weights that `load_segmenter` reads back."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rag_ecg.errors import ConfigError
from rag_ecg.paper.segmenter import SegmenterConfig, TraceUNet, load_segmenter, manifest_path
from training.segmenter_config import load_config
from training.segmenter_data import PagePool, ptbxl_rows
from training.train_segmenter import loss_fn, main, to_tensors

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "training" / "configs" / "segmenter_tiny.yaml"


def test_configs_load_and_bad_ones_fail_in_one_line(tmp_path):
    shipped = load_config(ROOT / "training" / "configs" / "segmenter.yaml")
    assert shipped.train_folds == [1, 2, 3, 4, 5, 6, 7, 8] and 9 not in shipped.train_folds
    assert set(shipped.presets) == {"clean", "print", "scan", "photo", "random"}
    assert load_config(TINY, ["steps=7", "lr=1e-4"]).steps == 7
    bad = tmp_path / "bad.yaml"
    for text, why in (("presets: [clean, fax]\n", "fax"), ("crop: 100\n", "crop: 100 is not a multiple"),
                      ("stepz: 3\n", "unknown SegmenterTrainConfig field"), ("fold: 3\n", "fold: 3")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=why) as err:
            load_config(bad)
        assert "\n" not in str(err.value) and "bad.yaml" in str(err.value)


def test_loss_falls_on_a_fixed_batch_of_real_labelled_pages(ptbxl_dir, one_thread):
    cfg = load_config(TINY, [f"ptbxl={ptbxl_dir}"])
    pool = PagePool(cfg, ptbxl_rows(cfg, cfg.train_folds, 4), seed=1)
    x, y = to_tensors(*pool.batch(6, 64))
    assert 0.003 < float(y.mean()) < 0.2  # crops of pages hold some trace, mostly paper
    torch.manual_seed(0)
    net = TraceUNet(SegmenterConfig(**cfg.net_config()))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = loss_fn(net(x), y, cfg.pos_weight, cfg.dice_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0], losses


def test_tiny_run_trains_resumes_and_exports(ptbxl_dir, tmp_path, one_thread, info_messages):
    lines = info_messages("training.train_segmenter")
    run, export = tmp_path / "run", tmp_path / "shipped" / "seg.safetensors"
    export.parent.mkdir()
    over = [f"ptbxl={ptbxl_dir}", f"run_dir={run}", "steps=12", "save_every=6", "log_every=3"]
    out = main(TINY, over, export=export)
    assert out == export and (run / "last" / "train_state.pt").is_file()
    seg = load_segmenter(export)
    page = np.full((100, 130, 3), 250, np.uint8)
    page[50:52, 10:120] = 0
    assert seg.trace_map(page).shape == (100, 130) and seg.trace_map(page).dtype == np.uint8
    manifest = json.loads(manifest_path(export).read_text())
    assert manifest["training"]["steps"] == 12 and "clean" in manifest["figures"]["trace_pixel_f1"]
    logged = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "step" in r] == [3, 6, 9, 12]
    main(TINY, over[:2] + ["steps=18", "save_every=6", "log_every=3"])  # resumes from step 12
    assert any("from step 12" in m for m in lines)
    assert json.loads(manifest_path(run / "segmenter.safetensors").read_text())["training"]["steps"] == 18
    with pytest.raises(ConfigError, match="another config"):
        main(TINY, over[:2] + ["steps=18", "lr=0.5"])
