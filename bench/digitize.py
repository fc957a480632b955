"""Digitiser benchmark: read rate, layout and Challenge SNR (dB) per set, classical vs learned, seconds per page.

Sets (issue 16):
- `own`: PTB-XL fold-9 records drawn by our renderer under each artifact preset (truth: the record in mV);
- `kit`: the ECG-Image-Kit pages in ../shared/data/ecg-image-kit (another renderer; truth: their record x 0.1 mV);
- `real`: the real printouts, scans and photos in ../shared/data/real-pictures (no signal truth: read rate and
  the layout against bench/real_picture_layouts.csv, a person's reading of each picture).
SNR is the PhysioNet Challenge 2024 score (`read_quality.snr_db`): per lead, after the best shift within ±0.2 s and
removal of a constant offset; `snr` uses the millivolt scale calibrated from the paper itself
(`calibration.calibrate`), `snr_fit` each lead's best gain (the read's shape alone). Refused pages are counted
apart, not averaged in. The baseline in the same run is the classical digitiser (`--methods` lists both), and for
`own` the cost of drawing the page.

    python bench/digitize.py                       # ~3 min: 20 own pages x 4 presets, 40 kit pages, 42 real
    python bench/digitize.py --n 100 --sets own,kit --presets clean,photo
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rag_ecg import paths  # noqa: E402
from rag_ecg.data.ecg_image_kit import read_kit_pages  # noqa: E402
from rag_ecg.data.images import load_image, to_rgb  # noqa: E402
from rag_ecg.data.records import STANDARD_LEADS, ptbxl_record, read_ptbxl_index  # noqa: E402
from rag_ecg.paper.calibration import calibrate, to_millivolts  # noqa: E402
from rag_ecg.paper.digitize import FS, DigitizeError, digitize, working_page  # noqa: E402
from rag_ecg.paper.read_quality import snr_db  # noqa: E402
from rag_ecg.paper.render import render_page_and_layout  # noqa: E402
from rag_ecg.paper.segmenter import default_segmenter  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20, help="own pages per preset; kit pages per kit preset")
    ap.add_argument("--dpi", type=int, default=100, help="dpi of the own pages")
    ap.add_argument("--sets", default="own,kit,real")
    ap.add_argument("--presets", default="clean,scan,photo,random")
    ap.add_argument("--methods", default="classical,learned,auto")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m != "learned" or default_segmenter() is not None]
    data = paths.shared_data_dir()
    if not (data / "ptbxl" / "ptbxl_database.csv").exists():
        raise SystemExit(f"shared data not found at {data} (set RAG_ECG_SHARED_DATA)")
    out: dict = {}
    sets = args.sets.split(",")
    if "own" in sets:
        rows, _ = read_ptbxl_index(data / "ptbxl")
        records = [ptbxl_record(r) for r in rows if r.fold == 9][: args.n]
        for preset in args.presets.split(","):
            pages = []
            for i, rec in enumerate(records):
                t = time.perf_counter()
                image, result = render_page_and_layout(rec, preset=preset, seed=7000 + i, dpi=args.dpi)
                render_s = time.perf_counter() - t
                cfg = result.config  # the renderer calls every one-strip page "3x4+II"; the strip is cfg.rhythm_lead
                layout = f"3x4+{cfg.rhythm_lead}" if cfg.layout == "3x4+II" else cfg.layout
                pages.append((np.asarray(image), _own_truth(rec, result), layout, render_s))
            _score_set(out, f"own/{preset}", pages, methods)
    if "kit" in sets:
        kit = read_kit_pages(data / "ecg-image-kit")
        for preset in sorted({p.preset for p in kit}):
            chosen = [p for p in kit if p.preset == preset][: args.n]
            pages = [(np.asarray(to_rgb(load_image(p.image))), p.truth()[0], p.layout(), None) for p in chosen]
            _score_set(out, f"kit/{preset}", pages, methods)
    if "real" in sets:
        expected = _real_layouts()
        for group in sorted(d.name for d in (data / "real-pictures").iterdir() if d.is_dir()):
            pics = sorted(p for p in (data / "real-pictures" / group).iterdir() if p.suffix.lower() != ".csv")
            pages = [(np.asarray(to_rgb(load_image(p))), None, _expected(expected, f"{group}/{p.name}"), None)
                     for p in pics]
            _score_set(out, f"real/{group}", pages, methods)
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


def _own_truth(rec, result) -> np.ndarray:
    """(12, 1000) mV on the page's 10-s axis, NaN where the page does not print the lead."""
    sig = rec.signal_mv()
    t = result.leads[0].t_start + np.arange(int(10 * FS)) / FS
    truth = np.full((12, t.size), np.nan, np.float32)
    src = np.arange(sig.shape[0]) / rec.fs
    for box in result.leads:
        i = STANDARD_LEADS.index(box.lead)
        m = (t >= box.t_start) & (t < box.t_end)
        truth[i, m] = np.interp(t[m], src, sig[:, i])
    return truth


def _score_set(out: dict, name: str, pages: list, methods: list[str]) -> None:
    """Read every page with each method; print one line per method and keep the figures in `out`."""
    for method in methods:
        read_s, refused, layout_ok, snr, snr_fit = 0.0, 0, 0, [], []
        for page, truth, layout, _ in pages:
            t = time.perf_counter()
            try:
                read = digitize(page, method=method)
                cal = calibrate(working_page(page, read), read)
            except DigitizeError:
                read = None
            read_s += time.perf_counter() - t
            if read is None:
                refused += 1
                continue
            layout_ok += read.layout == layout
            if truth is not None:
                mv = to_millivolts(read, cal, FS).T  # what `digitize` exports, at the read's 100 Hz
                snr.append(snr_db(mv, truth, FS)[0])
                snr_fit.append(snr_db(mv, truth, FS, fit_gain=True)[0])
        n = len(pages)
        render = [p[3] for p in pages if p[3] is not None]
        r = {"pages": n, "read": (n - refused) / n, "layout_correct": layout_ok / n,
             "snr_db": _mean(snr), "snr_db_median": float(np.median(snr)) if snr else None,
             "snr_fit_db": _mean(snr_fit), "seconds_per_page": read_s / n,
             "render_seconds_per_page": _mean(render)}
        out.setdefault(name, {})[method] = r
        base = out[name].get("classical")
        vs = f"  {r['seconds_per_page'] / base['seconds_per_page']:.1f}x classical time" if base and method != "classical" else ""
        snr_txt = (f"SNR {r['snr_db']:.1f} dB (median {r['snr_db_median']:.1f}, fitted gain {r['snr_fit_db']:.1f})"
                   if snr else "SNR -")
        print(f"{name:22s} {method:9s} read {r['read']:.2f}  layout {r['layout_correct']:.2f}  {snr_txt}  "
              f"{1000 * r['seconds_per_page']:.0f} ms/page{vs}", flush=True)


def _real_layouts() -> list[tuple[str, str]]:
    with (HERE / "real_picture_layouts.csv").open(newline="") as f:
        return [(r["picture"], r["layout"]) for r in csv.DictReader(f)]


def _expected(table: list[tuple[str, str]], picture: str) -> str:
    return next((layout for pattern, layout in table if fnmatch.fnmatch(picture, pattern)), "?")


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


if __name__ == "__main__":
    main()
