"""The job commands end to end through `cli.py`: `review` (a folder with a non-ECG picture, then a resume),
`train-encoder` and `train-segmenter` on tiny configs, each with its one-line bad-input case."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import select
from typer.testing import CliRunner

from cli import app
from rag_ecg.data.records import read_wfdb
from rag_ecg.data.store import Case
from rag_ecg.paper.render import render_page
from rag_ecg.paper.segmenter import DEFAULT_WEIGHTS, manifest_path

runner = CliRunner()
PAGES = {"page-a.png": "04240_lr", "page-b.png": "04319_lr"}  # PTB-XL records outside the small store


def _charts(folder: Path, ptbxl_dir: Path) -> None:
    """Two clean rendered PTB-XL pages and a gradient-and-noise 'photo' that holds no ECG traces."""
    folder.mkdir()
    for name, rec in PAGES.items():
        render_page(read_wfdb(ptbxl_dir / "records100" / rec), preset="clean", seed=0, dpi=100).save(folder / name)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:600, 0:800]
    photo = np.stack([x / 800 * 255, y / 600 * 200, (1 - x / 800) * 180], -1) + rng.normal(0, 25, (600, 800, 3))
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(folder / "holiday.png")


def test_review_a_folder_writes_every_output_names_the_bad_picture_and_resumes(tiny_index, scratch_store,
                                                                            ptbxl_dir, tmp_path):
    charts, out = tmp_path / "charts", tmp_path / "review"
    _charts(charts, ptbxl_dir)
    args = ["review", str(charts), "--out", str(out), "--index", str(tiny_index["index"]),
            "--db", scratch_store.url, "--workers", "1", "--batch-size", "4"]
    res = runner.invoke(app, args)
    # a chart that is not an ECG is an error row of the job, not a failed command: the run itself succeeded
    assert res.exit_code == 0, res.output
    assert "3 charts: 2 done, 0 unparsed, 1 error, 0 pending" in res.output
    assert "new job" in res.output and "this run: 3 charts" in res.output
    for name, file in (("csv", "results.csv"), ("jsonl", "results.jsonl"), ("html", "index.html"),
                       ("manifest", "manifest.json")):
        assert f"{name}: {out / file}" in res.output.splitlines(), res.output  # one whole line per path

    rows = {r["chart"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert sorted(rows) == ["holiday.png", *sorted(PAGES)]
    bad = rows["holiday.png"]
    assert bad["status"] == "error" and bad["error"].startswith("holiday.png: ") and not bad["neighbours"]
    assert "no readable ECG traces" in bad["error"], bad["error"]
    with scratch_store.session() as s:
        library = {c.id for c in s.scalars(select(Case)) if c.split == "train"}  # what the index holds
    for name in PAGES:
        r = rows[name]
        assert r["status"] == "done" and r["error"] is None, r["error"]
        retrieved = [n["case_id"] for n in r["neighbours"]]
        assert len(retrieved) == 8 and r["cited_cases"] and set(r["cited_cases"]) <= set(retrieved)
        assert r["report"]["backend"] == "retrieval" and r["impression"]
        assert set(retrieved) <= library
    with open(out / "results.csv", newline="") as f:
        table = {r["chart"]: r for r in csv.DictReader(f)}
    assert table["holiday.png"]["error"] == bad["error"]
    assert all(table[n]["cited_cases"].split() == [str(c) for c in rows[n]["cited_cases"]] for n in PAGES)
    html = (out / "index.html").read_text()
    assert all(name in html for name in rows)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"done": 2, "unparsed": 0, "error": 1, "pending": 0} and manifest["total"] == 3

    again = runner.invoke(app, args)  # the same command finds the finished job: nothing left to do
    assert again.exit_code == 0, again.output
    assert "resumed job" in again.output and "this run: 0 charts" in again.output
    assert "3 charts: 2 done, 0 unparsed, 1 error, 0 pending" in again.output
    assert {r["chart"]: r["cited_cases"] for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())} \
        == {k: v["cited_cases"] for k, v in rows.items()}

    missing = runner.invoke(app, ["review", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2"),
                                  "--index", str(tiny_index["index"]), "--db", scratch_store.url])
    assert missing.exit_code == 2, missing.output
    assert len(missing.output.strip().splitlines()) == 1 and "Traceback" not in missing.output
    assert missing.output.startswith("error: ") and "nowhere: no such file or folder" in missing.output


ENCODER_YAML = """\
model: ecg-clip-tiny
epochs: 1
max_steps: 6             # the epoch has 4 steps (16 cases / 4): only `--set max_steps=2` stops it early
batch_size: 4
limit_train: 16
limit_val: 8
lr: 0.003
warmup_steps: 1
dpi: 40
workers: 0
threads: 1
device: cpu
precision: fp32
val_every: 0
final_eval: false
log_every: 1
progress: false
"""


def test_train_encoder_writes_a_loadable_checkpoint_and_honours_set(ingested_store, ptbxl_dir, tmp_path):
    from rag_ecg.encoder.model import ECGEncoder

    cfg, run = tmp_path / "enc.yaml", tmp_path / "run"
    cfg.write_text(ENCODER_YAML + f"run_dir: {run}\n")
    res = runner.invoke(app, ["train-encoder", "--config", str(cfg), "--set", "max_steps=2",
                              "--db", ingested_store.url])
    assert res.exit_code == 0, res.output
    assert f"checkpoint: {run / 'encoder'}" in res.output.splitlines()  # the path whole, on one line
    assert {"manifest.json", "open_clip_model.safetensors"} <= {p.name for p in (run / "encoder").iterdir()}
    enc = ECGEncoder.load(run / "encoder")
    training = enc.manifest["training"]
    assert training["steps"] == 2 and training["stopped"] == "max_steps"  # --set max_steps=2 took effect
    assert training["config"]["model"] == "ecg-clip-tiny" and training["config"]["limit_train"] == 16
    steps = [json.loads(s)["step"] for s in (run / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in s]
    assert steps == [1, 2]
    page = render_page(read_wfdb(ptbxl_dir / "records100" / PAGES["page-a.png"]),
                       preset="clean", seed=0, dpi=100)
    emb = enc.embed_images([page])
    assert emb.shape == (1, enc.embed_dim) and np.isfinite(emb).all()
    assert abs(float(np.linalg.norm(emb[0])) - 1.0) < 1e-4

    bad = runner.invoke(app, ["train-encoder", "--config", str(cfg), "--set", "max_stepz=2",
                              "--db", ingested_store.url])
    assert bad.exit_code == 2, bad.output
    lines = bad.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "max_stepz" in lines[0], bad.output


SEGMENTER_YAML = """\
widths: [8, 12]
fold: 2
convs: 1
limit_records: 2
presets: [clean]
dpi_range: [60, 60]
zoom_range: [1.0, 1.0]
work_width: 480
crop: 64
pool: 1
pages_per_step: 0.5
steps: 2
batch_size: 2
lr: 0.01
warmup_steps: 1
threads: 1
save_every: 1
log_every: 1
val_pages: 1
val_presets: [clean]
"""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_segmenter_writes_its_weights_and_leaves_the_shipped_ones(ptbxl_dir, tmp_path):
    from rag_ecg.paper.segmenter import load_segmenter

    shipped = {p: _digest(p) for p in (DEFAULT_WEIGHTS, manifest_path(DEFAULT_WEIGHTS))}
    cfg, run = tmp_path / "seg.yaml", tmp_path / "seg-run"
    cfg.write_text(SEGMENTER_YAML + f"run_dir: {run}\nptbxl: {ptbxl_dir}\n")
    res = runner.invoke(app, ["train-segmenter", "--config", str(cfg), "--set", "seed=3"])
    assert res.exit_code == 0, res.output
    weights = run / "segmenter.safetensors"
    assert f"segmenter: {weights}" in res.output.splitlines()
    manifest = json.loads(manifest_path(weights).read_text())
    assert manifest["training"]["steps"] == 2 and manifest["training"]["config"]["seed"] == 3
    assert manifest["weights_sha256"] == _digest(weights)
    assert set(manifest["figures"]["trace_pixel_f1"]) == {"clean"}
    seg = load_segmenter(weights)
    page = np.full((80, 120, 3), 250, np.uint8)
    page[40:42, 10:110] = 0
    assert seg.trace_map(page).shape == (80, 120)
    assert {p: _digest(p) for p in shipped} == shipped  # the shipped weights were not touched

    bad = runner.invoke(app, ["train-segmenter", "--config", str(cfg), "--set", "fold=3"])
    assert bad.exit_code == 2, bad.output
    lines = bad.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "fold: 3" in lines[0], bad.output
