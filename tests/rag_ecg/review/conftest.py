"""The review tests' shared world: a real store + tiny-encoder index + a folder of good and planted bad charts.

The reference library is a real store (tests/conftest's 80 PTB-XL + 5 LUDB cases, copied) indexed with the
briefly trained tiny encoder (tests/conftest `tiny_encoder`: library cases spread over cosines ~0-0.99, so
scores and neighbour order mean something). Good charts are drawn the way the library pages are (clean preset
at the index's 100 dpi, saved as PNG/JPEG/PDF/BMP/TIFF, plus a raw WFDB record the review draws itself). The
gradient+noise picture holds no trace rows: the digitiser's check refuses it while loading, as it would for
any encoder. Built once per session on disk (`review_env`); `uninterrupted` is one clean run every test
compares against. The helpers below are imported by the test modules (`from tests.rag_ecg.review.conftest`).
"""
from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index.build import BuildConfig, build_index
from rag_ecg.data.records import read_wfdb
from rag_ecg.data.store import open_store
from rag_ecg.paper.render import render_page
from rag_ecg.review.run import review

# (chart path in the folder, PTB-XL record, PIL save options): clean pages of records outside the store
GOOD = [
    ("good/page.png", "04240_lr", {}),
    ("good/page.jpg", "04319_lr", {"quality": 95}),
    ("good/page.pdf", "04192_lr", {"resolution": 100.0}),
    ("good/page.bmp", "04355_lr", {}),
    ("good/page.tif", "04141_lr", {}),
    ("good/nested/other.png", "04215_lr", {}),
]
GOOD_WFDB = ("good/wfdb", "04385_lr")  # copied as .hea/.dat; the review draws it
BAD = {  # chart key -> what its one-line error must say
    "bad/corrupt.png": "corrupt or truncated",
    "bad/text.jpg": "not an image",
    "bad/empty.png": "empty file",
    "bad/gradient.png": "no readable ECG traces",
    "bad/04178_lr.hea": "truncated",
    "bad/broken.pdf": "unreadable PDF",
    "notes.txt": "notes.txt: not an ECG picture or WFDB record: .txt",  # every file of the folder gets a row
}
GOOD_KEYS = sorted([g[0] for g in GOOD] + [f"{GOOD_WFDB[0]}/{GOOD_WFDB[1]}.hea"])
ALL_KEYS = sorted(GOOD_KEYS + list(BAD))
BATCH = 4  # every run of the same job uses it: results are then reproduced exactly


def make_charts(folder: Path, ptbxl_dir: Path) -> None:
    """Real rendered charts in several formats + the planted bad files."""
    recs = ptbxl_dir / "records100"
    for rel, rec, opts in GOOD:
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        render_page(read_wfdb(recs / rec), preset="clean", seed=0, dpi=100).save(p, **opts)
    wf = folder / GOOD_WFDB[0]
    wf.mkdir(parents=True, exist_ok=True)
    for ext in (".hea", ".dat"):
        shutil.copy(recs / f"{GOOD_WFDB[1]}{ext}", wf / f"{GOOD_WFDB[1]}{ext}")
    bad = folder / "bad"
    bad.mkdir()
    png = (folder / "good/page.png").read_bytes()
    (bad / "corrupt.png").write_bytes(png[: len(png) // 3])
    (bad / "text.jpg").write_text("Patient list, not a picture\n")
    (bad / "empty.png").write_bytes(b"")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:600, 0:800]
    photo = np.stack([x / 800 * 255, y / 600 * 200, (1 - x / 800) * 180], -1) + rng.normal(0, 25, (600, 800, 3))
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(bad / "gradient.png")
    shutil.copy(recs / "04178_lr.hea", bad / "04178_lr.hea")
    dat = (recs / "04178_lr.dat").read_bytes()
    (bad / "04178_lr.dat").write_bytes(dat[: len(dat) // 2])
    (bad / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj garbage\n")
    (folder / "notes.txt").write_text("not a chart: an error row, never opened\n")


def copy_db(src_url: str, dst: Path) -> str:
    """A consistent copy of a SQLite store (sqlite backup API): same case ids as the original."""
    src = sqlite3.connect(src_url.removeprefix("sqlite:///"))
    out = sqlite3.connect(dst)
    src.backup(out)
    out.close()
    src.close()
    return f"sqlite:///{dst}"


def build_env(base: Path, ingested_store, encoder: Path, ptbxl_dir: Path) -> dict:
    """Store copy + tiny-encoder index + charts folder, built once per session (a marker file on disk)."""
    marker = base / "ready.json"
    if marker.exists():
        return json.loads(marker.read_text())
    base.mkdir(parents=True, exist_ok=True)
    url = copy_db(ingested_store.url, base / "cases.db")
    shutil.copytree(encoder, base / "encoder")
    store = open_store(url)
    build_index(store, base / "encoder", name="review-test", out_dir=base / "index",
                cfg=BuildConfig(workers=1, page_width=400), progress=False)
    store.dispose()
    make_charts(base / "charts", ptbxl_dir)
    env = {"db": str(base / "cases.db"), "url": url, "index": str(base / "index"), "charts": str(base / "charts"),
           "base": str(base)}
    marker.write_text(json.dumps(env))
    return env


def fresh_store(env: dict, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    return copy_db(env["url"], folder / "review.db")


def rows_of(out_dir: Path) -> dict[str, dict]:
    return {r["chart"]: r for r in map(json.loads, (out_dir / "results.jsonl").read_text().splitlines())}


def comparable(row: dict) -> dict:
    """What must match between runs of the same job (not timings, attempts, finish times)."""
    return {k: row[k] for k in ("chart", "status", "error", "diagnoses", "impression", "cited_cases",
                                "neighbours", "report")}


def assert_close(a, b, where: str = "", tol: float = 1e-4) -> None:
    """Deep equality with float tolerance: what 'the same results' means across processes whose torch
    was started with other thread settings (Ray actors run one thread): embeddings then differ in the
    last float32 bit, similarities by ~1e-7; ids, statuses, labels and texts must still be equal."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=tol), where
    elif isinstance(a, dict) and isinstance(b, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}", tol)
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]", tol)
    else:
        assert a == b, where


@pytest.fixture(scope="session")
def review_env(tmp_path_factory, ingested_store, tiny_encoder, ptbxl_dir) -> dict:
    return build_env(tmp_path_factory.getbasetemp() / "review-env", ingested_store, tiny_encoder, ptbxl_dir)


@pytest.fixture(scope="session")
def uninterrupted(review_env) -> dict:
    """One uninterrupted local review of the charts folder (loader processes, batches of 4)."""
    base = Path(review_env["base"]) / "uninterrupted"
    marker = base / "summary.json"
    if not marker.exists():
        url = fresh_store(review_env, base)
        s = review(review_env["charts"], base / "out", store=url, index_dir=review_env["index"], workers=2,
                   batch_size=BATCH, progress=False)
        marker.write_text(json.dumps(s.to_dict()))
    return {"summary": json.loads(marker.read_text()), "out": base / "out", "url": f"sqlite:///{base / 'review.db'}"}
