"""The encoder recipe: the loss falls on real rendered ECGs; a real run trains, logs, resumes, evaluates."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rag_ecg.errors import ConfigError
from training.encoder_config import EncoderTrainConfig, load_config
from training.encoder_data import EpochBatches, render_seed
from training.encoder_objective import Objective, TrainModule, lr_lambda, param_groups
from training.train_encoder import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "training" / "configs" / "encoder_tiny.yaml"


def test_configs_load_and_reject_unknown_fields():
    for name in ("encoder_tiny.yaml", "encoder_cpu.yaml", "encoder_gpu.yaml"):
        cfg = load_config(ROOT / "training" / "configs" / name)
        assert cfg.train_folds == [1, 2, 3, 4, 5, 6, 7, 8] and cfg.val_folds == [9]
    cfg = load_config(TINY, ["epochs=7", "eval-presets=[clean]", "lr=1e-4"])
    assert (cfg.epochs, cfg.eval_presets, cfg.lr) == (7, ["clean"], 1e-4)
    with pytest.raises(ValueError, match="unknown EncoderTrainConfig field\\(s\\) epoch "):
        load_config(TINY, {"epoch": 3})
    with pytest.raises(ValueError, match="batch_size: contrastive training needs at least 2"):
        EncoderTrainConfig(batch_size=1)
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config("nope.yaml")


def test_epoch_batches_shard_permute_and_repeat_exactly():
    a = EpochBatches(10, 2, seed=3, start_epoch=0, epochs=2, rank=0, world=2)
    b = EpochBatches(10, 2, seed=3, start_epoch=0, epochs=2, rank=1, world=2)
    ba, bb = list(a), list(b)
    assert len(ba) == len(a) == 4  # 5 cases per rank -> 2 full batches per epoch
    e0 = {i for batch in ba[:2] + bb[:2] for e, i in batch}
    assert len(e0) == 8 and all(e == 0 for batch in ba[:2] for e, _ in batch)  # disjoint shards
    assert [i for bt in ba[:2] for _, i in bt] != [i for bt in ba[2:] for _, i in bt]  # a new order per epoch
    resumed = list(EpochBatches(10, 2, seed=3, start_epoch=1, epochs=2, rank=0, world=2))
    assert resumed == ba[2:]  # a resumed run sees the very batches it would have
    assert render_seed(0, 1, 2) == render_seed(0, 1, 2) != render_seed(0, 2, 1)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        EpochBatches(3, 4, 0, 0, 1)


def test_schedule_warms_up_then_decays_to_the_floor():
    f = lr_lambda(warmup=4, total=20, floor=0.1)
    assert [round(f(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(12) == pytest.approx(0.55) and f(20) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 30))


@pytest.mark.parametrize("model,dpi", [("ecg-clip-tiny", 40), ("ecg-clip-trace", 100)])
def test_loss_falls_on_a_fixed_batch_of_real_rendered_ecgs(ptbxl_dir, model, dpi):
    """Overfit 8 real PTB-XL pages with their real report texts: ClipLoss + aux BCE must drop (pixel tower, and
    the trace tower reading the same kind of pages through the digitiser)."""
    import torch

    from rag_ecg.encoder.model import ECGEncoder
    from rag_ecg.encoder.text import case_text
    from rag_ecg.eval.metrics import labels_to_matrix
    from rag_ecg.data.labels import SUPERCLASSES
    from rag_ecg.data.records import ptbxl_record, read_ptbxl_index
    from rag_ecg.paper.render import render_page

    rows, statements = read_ptbxl_index(ptbxl_dir)
    desc = {c: s.description for c, s in statements.items()}
    picked, seen = [], set()
    for r in rows:  # 8 distinct report texts: identical texts would floor the CLIP loss at log(#copies)
        text = case_text(r.report, r.codes, desc)
        if text not in seen:
            seen.add(text)
            picked.append(r)
        if len(picked) == 8:
            break
    recs = [ptbxl_record(r) for r in picked]
    enc = ECGEncoder.create(model, seed=0, aux_classes=SUPERCLASSES)
    pages = [render_page(r, preset="random", seed=i, dpi=dpi) for i, r in enumerate(recs)]
    # training reads rendered pages leniently: a page the digitiser cannot read is a hard example, not an error
    pixels = torch.from_numpy(np.stack([enc.preprocess.pixels(p, strict=False) for p in pages]))
    x = enc.model_input(pixels)
    tok = enc.tokenizer([case_text(r.report, r.codes, desc) for r in recs])
    y = torch.from_numpy(labels_to_matrix([r.labels for r in recs]).astype(np.float32))
    module = TrainModule(enc)
    opt = torch.optim.AdamW(param_groups(module, 0.0), lr=3e-3)
    objective = Objective(aux_weight=1.0)
    module.train()
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: a second thread only spin-waits on a shared machine
    try:
        for _ in range(25):
            loss, parts = objective(*module(x, tok), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(parts)
    finally:
        torch.set_num_threads(threads)
    first, last = losses[0], losses[-1]
    assert last["loss"] < 0.5 * first["loss"], (first, last)
    assert last["clip_loss"] < first["clip_loss"] and last["aux_loss"] < first["aux_loss"]


def test_trace_items_mix_signal_reads_and_digitised_pages(ptbxl_dir):
    """signal_fraction picks, per (epoch, record) seed, a signal read or a rendered page; both give the
    trace tower's (24, 1000) input, and an epoch redraws (new layout / new page)."""
    import torch

    from rag_ecg.encoder.model import ECGEncoder
    from rag_ecg.data.records import ptbxl_record, read_ptbxl_index
    from training.encoder_data import CaseSet, RenderedPages

    rows, _ = read_ptbxl_index(ptbxl_dir)
    recs = [ptbxl_record(r) for r in rows[:4]]
    cases = CaseSet(records=recs, texts=["x"] * 4, labels=np.zeros((4, 5), np.uint8), keys=[str(i) for i in range(4)])
    pre = ECGEncoder.create("ecg-clip-trace", seed=0).preprocess
    tokens = torch.zeros((4, 77), dtype=torch.long)
    signal_only = RenderedPages(cases, tokens, pre, "random", 0.0, 100, 0, signal_fraction=1.0)
    pages_only = RenderedPages(cases, tokens, pre, "random", 0.0, 100, 0, signal_fraction=0.0)
    a, b = signal_only[(0, 1)][0].numpy(), signal_only[(1, 1)][0].numpy()
    assert a.shape == b.shape == (24, 1000) and not np.array_equal(a, b)
    np.testing.assert_array_equal(a, signal_only[(0, 1)][0].numpy())  # seeded: a resumed run redraws it
    page = pages_only[(0, 1)][0].numpy()
    assert page.shape == (24, 1000) and page[12:].any()  # leads were read off the page
    mixed = RenderedPages(cases, tokens, pre, "random", 0.0, 100, 0, signal_fraction=0.5)
    assert mixed.signal_fraction == 0.5
    tiny_pre = ECGEncoder.create("ecg-clip-tiny", seed=0).preprocess
    assert RenderedPages(cases, tokens, tiny_pre, "random", 0.0, 40, 0, signal_fraction=0.5).signal_fraction == 0.0


def test_recipe_trains_logs_resumes_and_evaluates(ingested_store, tmp_path):
    """Two epochs of the tiny recipe on the real store, then a third resumed from run_dir/last."""
    from rag_ecg.encoder.model import ECGEncoder

    run = tmp_path / "run"
    over = {"db": ingested_store.url, "run_dir": str(run), "epochs": 1, "batch_size": 8}
    out = main(TINY, over)
    assert out == run / "encoder"
    enc = ECGEncoder.load(out)
    m = enc.manifest
    assert m["training"]["epochs_done"] == 1 and m["training"]["stopped"] == "completed"
    assert m["training_data_hash"] and len(m["training_data_hash"]) == 64
    for preset in ("random", "clean"):
        mm = m["metrics"]
        for key in ("auc", "auc_binarized", "f1"):  # macro means of the per-class figures
            per = [mm[f"{preset}/per_class/{c}/{key}"] for c in ("NORM", "MI", "STTC", "CD", "HYP")]
            assert mm[f"{preset}/{key}"] == pytest.approx(float(np.mean(per)), nan_ok=True), (preset, key)
        for way in ("image_to_report", "report_to_image"):
            assert mm[f"{preset}/{way}/R@1"] <= mm[f"{preset}/{way}/R@5"] <= mm[f"{preset}/{way}/R@10"]
    assert m["metrics"]["library_size"] == 68 and m["metrics"]["n_queries"] == 12
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if "train_loss" in r]
    assert [r["epoch"] for r in epochs] == [1]
    assert all("val_clip_loss" in r and "val_aux_auc" in r for r in epochs)
    assert any("final" in r for r in lines)
    steps = [r for r in lines if "step" in r and "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 68 // 8 + 1))

    # resume: a second epoch continues from the saved optimizer/scheduler state
    out2 = main(TINY, {**over, "epochs": 2, "final_eval": False})
    lines2 = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()][len(lines):]
    assert [r["epoch"] for r in lines2 if "train_loss" in r] == [2]
    assert [r["step"] for r in lines2 if "loss" in r] == list(range(68 // 8 + 1, 2 * (68 // 8) + 1))
    enc2 = ECGEncoder.load(out2)
    assert enc2.manifest["training"]["epochs_done"] == 2 and enc2.checkpoint_hash != enc.checkpoint_hash

    # a changed optimisation config refuses to resume into the same run (before reading any data)
    with pytest.raises(ValueError, match="saved run used another config"):
        main(TINY, {**over, "epochs": 3, "lr": 0.01, "final_eval": False})
