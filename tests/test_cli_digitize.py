"""`cli.py digitize` end to end on real pictures: a batch with a corrupt file reads the rest, names the bad one
on one line and exits 2; a rerun skips what is done; folders are walked."""
from __future__ import annotations

import shutil

import wfdb
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def test_batch_reads_the_good_pictures_names_the_bad_one_and_resumes(shared_data, tmp_path):
    pics = tmp_path / "pictures"
    (pics / "more").mkdir(parents=True)
    shutil.copy(shared_data / "real-pictures" / "assorted" / "ecg00021.bmp", pics / "ecg00021.bmp")
    shutil.copy(shared_data / "real-pictures" / "khan" / "NORMAL_0057.jpg", pics / "more" / "khan page.jpg")
    good = (shared_data / "real-pictures" / "assorted" / "ecg00006.png").read_bytes()
    (pics / "broken.png").write_bytes(good[:len(good) // 3])  # truncated: not a readable picture
    out = tmp_path / "out"

    res = runner.invoke(app, ["digitize", str(pics), "--out", str(out)])
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "broken.png" in errors[0], res.output
    assert "3 pictures: 2 read, 0 skipped (outputs exist), 1 failed" in res.output
    for stem in ("ecg00021", "khan_page"):
        assert {p.name for p in out.glob(f"{stem}.*")} == {f"{stem}{s}" for s in (".dat", ".hea", ".json",
                                                                                   ".overlay.png")}
        rec = wfdb.rdrecord(str(out / stem))
        assert rec.fs == 500 and rec.sig_len == 5000 and rec.units == ["mV"] * 12
    assert not list(out.glob("broken*"))

    again = runner.invoke(app, ["digitize", str(pics / "ecg00021.bmp"), str(pics / "more"), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert "2 pictures: 0 read, 2 skipped (outputs exist), 0 failed" in again.output

    forced = runner.invoke(app, ["digitize", str(pics / "ecg00021.bmp"), "--out", str(out), "--force",
                                 "--speed", "25", "--gain", "10"])
    assert forced.exit_code == 0 and "1 picture: 1 read" in forced.output, forced.output


def test_no_pictures_is_one_line_and_bad_input(tmp_path):
    (tmp_path / "notes.txt").write_text("not a picture")
    res = runner.invoke(app, ["digitize", str(tmp_path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and res.output.strip().splitlines()[-1].startswith("error: no pictures found")
    bad = runner.invoke(app, ["digitize", str(tmp_path), "--out", str(tmp_path / "out"), "--gain", "0"])
    assert bad.exit_code == 2 and "error: gain 0.0 mm/mV is outside" in bad.output


def test_learned_method_reads_with_the_shipped_segmenter(shared_data, tmp_path):
    """`--method learned` reads through the shipped trace segmenter and says so in the JSON; an unknown method is
    one line, exit 2."""
    import json

    pic = shared_data / "real-pictures" / "khan" / "NORMAL_0057.jpg"
    res = runner.invoke(app, ["digitize", str(pic), "--out", str(tmp_path), "--method", "learned"])
    assert res.exit_code == 0, res.output
    desc = json.loads((tmp_path / "NORMAL_0057.json").read_text())
    assert desc["method"] == "learned" and desc["layout"] == "3x4+II"
    bad = runner.invoke(app, ["digitize", str(pic), "--out", str(tmp_path / "x"), "--method", "magic"])
    assert bad.exit_code == 2 and "error: digitize method 'magic' is not one of" in bad.output
