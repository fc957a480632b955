"""Site calibration (`cli.py calibrate`): a hospital's labelled charts move the index's probabilities to its label
mix without changing their order, refit the thresholds, and every later search uses them until `--reset`."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from index.site_calibration import fit_site, reset_site
from rag_ecg.data.labels import SUPERCLASSES
from rag_ecg.data.records import read_wfdb
from rag_ecg.errors import InputError
from rag_ecg.eval.pipeline import load_labelled
from rag_ecg.paper.render import render_page
from rag_ecg.review.config import ReviewConfig
from rag_ecg.review.jobs import job_key
from rag_ecg.review.run import index_info
from rag_ecg.search.calibration import SITE_CALIBRATION, _sigmoid, fit_shift
from rag_ecg.search.retrieve import Retriever


def test_the_shift_recovers_a_known_change_of_label_mix():
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 1.5, 20000)
    y = rng.random(20000) < _sigmoid(z + 1.5)  # the site's positives are e^1.5 times as likely at every score
    assert fit_shift(z, y) == pytest.approx(1.5, abs=0.08)
    assert fit_shift(z, rng.random(20000) < _sigmoid(z)) == pytest.approx(0.0, abs=0.08)


@pytest.fixture
def site_index(tiny_index, tmp_path):
    """A private copy of the session's tiny index (calibrating writes into the folder)."""
    return shutil.copytree(tiny_index["index"], tmp_path / "index")


def _scores(ret, pages):
    return np.array([[ev.superclass_scores[s] for s in SUPERCLASSES] for ev in ret.search_images(pages, k=4)])


def test_a_site_calibration_moves_probabilities_keeps_their_order_and_is_used_until_reset(
        site_index, ingested_store, ptbxl_dir):
    labelled = load_labelled(ptbxl_dir, "val", limit=24)  # 24 real fold-9 ECGs drawn as clean pages
    queries = [render_page(read_wfdb(c.path[:-4]), preset="scan", seed=i, dpi=100)
               for i, c in enumerate(load_labelled(ptbxl_dir, "val", limit=30).charts[24:])]
    before = Retriever.open(site_index, ingested_store)
    assert before.site_calibration is None
    p0 = _scores(before, queries)
    key0 = job_key("charts.csv", ReviewConfig(), index_info(site_index))

    out = fit_site(labelled, site_index, ingested_store, preset="clean", workers=1)
    y = np.array([[s in c.labels for s in SUPERCLASSES] for c in labelled.charts])
    assert out["charts"] == 24 and out["unread"] == []
    assert out["refitted"] == [s for j, s in enumerate(SUPERCLASSES) if 0 < y[:, j].sum() < 24]
    assert set(out["calibration"]["site"]) == set(out["refitted"]) and (site_index / SITE_CALIBRATION).is_file()
    assert all(0.0 <= t <= 1.0 for lab, t in out["calibration"]["thresholds"].items() if lab in out["refitted"])

    after = Retriever.open(site_index, ingested_store)
    assert after.site_calibration["set"] == labelled.name and "site recalibration" in after.calibration.fitted_on
    p1 = _scores(after, queries)
    for j, lab in enumerate(SUPERCLASSES):
        if lab in out["refitted"]:
            shift = out["calibration"]["site"][lab][1]
            assert (np.sign(p1[:, j] - p0[:, j]) == np.sign(shift)).all() or abs(shift) < 1e-6
            assert (np.argsort(p1[:, j], kind="stable") == np.argsort(p0[:, j], kind="stable")).all() \
                or len(set(np.round(p0[:, j], 6))) < len(p0)  # the same order (ties aside)
        else:
            np.testing.assert_allclose(p1[:, j], p0[:, j])
    assert job_key("charts.csv", ReviewConfig(), index_info(site_index)) != key0  # another job, not mixed

    assert reset_site(site_index) and not reset_site(site_index)
    np.testing.assert_allclose(_scores(Retriever.open(site_index, ingested_store), queries), p0)
    assert job_key("charts.csv", ReviewConfig(), index_info(site_index)) == key0


def test_too_few_charts_or_no_data_is_one_line(site_index, ingested_store, ptbxl_dir):
    with pytest.raises(InputError, match="5 charts read, 20 needed"):
        fit_site(load_labelled(ptbxl_dir, "val", limit=5), site_index, ingested_store, preset="clean", workers=1)
    assert not (site_index / SITE_CALIBRATION).exists()
    res = CliRunner().invoke(app, ["calibrate", "--index", str(site_index), "--db", ingested_store.url])
    assert res.exit_code == 2 and "give --data" in res.output
    res = CliRunner().invoke(app, ["calibrate", "--index", str(site_index), "--reset", "--db", ingested_store.url])
    assert res.exit_code == 0 and "had no site calibration" in res.output
