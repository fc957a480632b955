"""Digitiser benchmark: how well and how fast `rag_ecg.paper.digitize` reads pages back, per artifact preset.

Why: the trace encoder sees an ECG only through the digitiser, so its read quality bounds retrieval on
scanned and photographed charts. Pages are real PTB-XL fold-9 records drawn by the renderer (random
layout, speed, gain and grid colour for `random`; the default 3x4 + II page otherwise), so the truth is
known: per page we score the layout read, refusals, and the agreement of the read traces with the recorded
signal in the same layout (`digitize.canonicalize`): the per-lead correlation, best within ±30 ms, averaged
over the 12 leads the page prints — a lead the read misses counts 0 (`digitize.agreement`). The baseline,
measured in the same run on the same pages, is the cost of drawing them: digitising should not cost much
more than rendering (both run once per page in training and indexing).

    python bench/digitize.py               # ~1 min: 40 pages per preset at 100 dpi
    python bench/digitize.py --n 100 --dpi 200 --presets clean,scan,photo,random
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rag_ecg import paths  # noqa: E402
from rag_ecg.paper.digitize import DigitizeError, canonicalize, digitize  # noqa: E402
from rag_ecg.paper.read_quality import agreement  # noqa: E402
from rag_ecg.data.records import ptbxl_record, read_ptbxl_index  # noqa: E402
from rag_ecg.paper.render import render_page_and_layout  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=40, help="pages per preset")
    ap.add_argument("--dpi", type=int, default=100)
    ap.add_argument("--presets", default="clean,scan,photo,random")
    args = ap.parse_args()
    root = paths.shared_data_dir() / "ptbxl"
    if not (root / "ptbxl_database.csv").exists():
        raise SystemExit(f"PTB-XL not found at {root} (set RAG_ECG_SHARED_DATA)")
    rows, _ = read_ptbxl_index(root)
    records = [ptbxl_record(r) for r in rows if r.fold == 9][: args.n]
    out = {}
    for preset in args.presets.split(","):
        render_s, read_s, layout_ok, refused, agree = 0.0, 0.0, 0, 0, []
        for i, rec in enumerate(records):
            t = time.perf_counter()
            image, result = render_page_and_layout(rec, preset=preset, seed=7000 + i, dpi=args.dpi)
            page = np.asarray(image)
            render_s += time.perf_counter() - t
            t = time.perf_counter()
            try:
                read = digitize(page)
            except DigitizeError:
                read = None
            read_s += time.perf_counter() - t
            if read is None:
                refused += 1
                continue
            cfg = result.config
            layout_ok += read.layout == cfg.layout
            truth, tmask = canonicalize(rec.signal_mv(), rec.fs, cfg.layout, cfg.rhythm_lead, result.leads[0].t_start)
            agree.append(agreement(read.signal, read.mask, truth, tmask))
        n = len(records)
        out[preset] = {"pages": n, "layout_correct": layout_ok / n, "refused": refused / n,
                       "agreement_mean": float(np.mean(agree)) if agree else 0.0,
                       "agreement_median": float(np.median(agree)) if agree else 0.0,
                       "digitize_ms": 1000 * read_s / n, "render_ms": 1000 * render_s / n,
                       "digitize_vs_render": read_s / max(render_s, 1e-9)}
        r = out[preset]
        print(f"{preset:7s} layout {r['layout_correct']:.2f}  refused {r['refused']:.2f}  "
              f"agreement mean {r['agreement_mean']:.3f} median {r['agreement_median']:.3f}  "
              f"digitise {r['digitize_ms']:.0f} ms/page = {r['digitize_vs_render']:.1f}x render "
              f"({r['render_ms']:.0f} ms)",
              flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
