"""Render benchmark: pages/s of `render_page` (clean and random presets) on one core and on all cores,
against a straightforward matplotlib rendering of the same record measured in the same run.

Why: the encoder redraws every training record every epoch and index builds draw every case, so page
synthesis must not be the bottleneck. The baseline draws the way ECG-image-kit does (a gridded matplotlib
figure: major/minor tick grids, one `plot` per lead segment, text labels, `savefig` at the same dpi); the
target is clean >= 50x the baseline per page on one core.

Both sides are timed to an in-memory RGB image (ours: a PIL image; matplotlib: `savefig(format="raw")`
into a PIL image). `--png` also times encoding both to PNG bytes, as files on disk would need.

    python bench/render.py                  # ~1 min: 20 pages per measurement, 3 baseline pages, 200 dpi
    python bench/render.py --n 100 --baseline-n 5 --png --dpi 300
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rag_ecg import paths  # noqa: E402
from rag_ecg.data.records import ECGRecord, ptbxl_record, read_ptbxl_index  # noqa: E402
from rag_ecg.paper.render import render_page  # noqa: E402

_RECORDS: list[ECGRecord] = []


def load_records(n: int) -> list[ECGRecord]:
    root = paths.shared_data_dir() / "ptbxl"
    if not (root / "ptbxl_database.csv").exists():
        raise SystemExit(f"PTB-XL not found at {root} (set RAG_ECG_SHARED_DATA)")
    rows, _ = read_ptbxl_index(root)
    return [ptbxl_record(r) for r in rows[:n]]


def matplotlib_page(rec: ECGRecord, dpi: int, fmt: str = "raw"):
    """ECG-image-kit style: A4 figure in mm coordinates, 1/5 mm tick grids, plt.plot per lead, savefig."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import AutoMinorLocator

    sig, fs = rec.signal_mv(), rec.fs
    fig, ax = plt.subplots(figsize=(297 / 25.4, 210 / 25.4))
    fig.subplots_adjust(0, 0, 1, 1)
    ax.set_xlim(0, 297)
    ax.set_ylim(0, 210)
    ax.set_xticks(np.arange(0, 297, 5))
    ax.set_yticks(np.arange(0, 210, 5))
    ax.xaxis.set_minor_locator(AutoMinorLocator(5))
    ax.yaxis.set_minor_locator(AutoMinorLocator(5))
    ax.grid(which="major", linestyle="-", linewidth=0.6, color=(0.91, 0.47, 0.47))
    ax.grid(which="minor", linestyle="-", linewidth=0.3, color=(0.97, 0.77, 0.77))
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    rows = [["I", "aVR", "V1", "V4"], ["II", "aVL", "V2", "V5"], ["III", "aVF", "V3", "V6"]]
    n = int(2.5 * fs)
    for r, leads in enumerate(rows):
        base = 165 - r * 42
        ax.plot([9, 10, 10, 15, 15, 17], [base, base, base + 10, base + 10, base, base], color="k", lw=0.85)
        for c, lead in enumerate(leads):
            s = sig[c * n:(c + 1) * n + 1, rec.leads.index(lead)]
            ax.plot(18 + c * 62.5 + np.arange(len(s)) / fs * 25, base + s * 10, color="k", lw=0.85)
            ax.text(19 + c * 62.5, base + 14, lead, fontsize=9)
    s = sig[: 4 * n, rec.leads.index("II")]
    ax.plot(18 + np.arange(len(s)) / fs * 25, 39 + s * 10, color="k", lw=0.85)
    ax.text(19, 53, "II", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format=fmt)
    w, h = fig.canvas.get_width_height(physical=True)
    plt.close(fig)
    if fmt == "raw":
        return Image.frombuffer("RGBA", (int(w * dpi / fig.dpi), int(h * dpi / fig.dpi)), buf.getvalue(),
                                "raw", "RGBA", 0, 1).convert("RGB")
    return buf.getvalue()


def _ours(rec: ECGRecord, preset: str, seed: int, dpi: int, png: bool):
    img = render_page(rec, preset=preset, seed=seed, dpi=dpi)
    if png:
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=6)
        return len(buf.getvalue())
    return img.size


def _init(records: list[ECGRecord]) -> None:
    _RECORDS[:] = records


def _job(args) -> int:
    i, preset, dpi, png = args
    _ours(_RECORDS[i % len(_RECORDS)], preset, i, dpi, png)
    return i


def time_serial(records, preset, n, dpi, png) -> float:
    """Seconds per page, one process (rag_ecg.paper.drawing keeps OpenCV at one thread)."""
    _ours(records[0], preset, 0, dpi, png)  # warm caches (grid page, fonts)
    t = time.perf_counter()
    for i in range(n):
        _ours(records[i % len(records)], preset, i, dpi, png)
    return (time.perf_counter() - t) / n


def time_parallel(records, preset, n, dpi, png, workers) -> float:
    """Seconds per page with `workers` processes (pool start-up and warm-up excluded)."""
    with ProcessPoolExecutor(workers, initializer=_init, initargs=(records,)) as pool:
        list(pool.map(_job, [(i, preset, dpi, png) for i in range(workers * 2)]))  # warm every worker
        t = time.perf_counter()
        list(pool.map(_job, [(i, preset, dpi, png) for i in range(n)], chunksize=max(1, n // (workers * 4))))
        return (time.perf_counter() - t) / n


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="pages per measurement of ours")
    ap.add_argument("--baseline-n", type=int, default=3, help="matplotlib pages")
    ap.add_argument("--dpi", type=int, default=200)
    ap.add_argument("--workers", type=int, default=0, help="processes for the all-cores run (0: every core)")
    ap.add_argument("--records", type=int, default=8, help="PTB-XL records cycled through")
    ap.add_argument("--png", action="store_true", help="also encode every page to PNG bytes (both sides)")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    a = ap.parse_args(argv)
    workers = a.workers or os.cpu_count() or 1
    records = load_records(a.records)
    rec = records[0]
    fmt = "png" if a.png else "raw"

    matplotlib_page(rec, a.dpi, fmt)  # import and font cache warm-up
    t = time.perf_counter()
    for _ in range(a.baseline_n):
        matplotlib_page(rec, a.dpi, fmt)
    base = (time.perf_counter() - t) / a.baseline_n

    rows = [("matplotlib (ECG-image-kit style)", 1, base)]
    for preset in ("clean", "random"):
        rows.append((f"render_page {preset}", 1, time_serial(records, preset, a.n, a.dpi, a.png)))
        if workers > 1:
            rows.append((f"render_page {preset}", workers,
                         time_parallel(records, preset, a.n * workers, a.dpi, a.png, workers)))

    out = "PNG bytes" if a.png else "in-memory RGB image"
    print(f"\nrender benchmark: {a.dpi} dpi A4 pages (3x4+II), output = {out}, {os.cpu_count()} cores, "
          f"{len(records)} PTB-XL records")
    print(f"{'method':34s} {'procs':>5s} {'ms/page':>9s} {'pages/s':>9s} {'x matplotlib':>13s}")
    result = {"dpi": a.dpi, "png": a.png, "cores": os.cpu_count(), "rows": []}
    for name, procs, sec in rows:
        ratio = base / sec
        print(f"{name:34s} {procs:5d} {sec * 1e3:9.1f} {1 / sec:9.2f} {ratio:12.1f}x")
        result["rows"].append({"method": name, "processes": procs, "s_per_page": sec, "pages_per_s": 1 / sec,
                               "x_matplotlib": ratio})
    clean = next(s for n, p, s in rows if n == "render_page clean" and p == 1)
    if a.png:
        print("(PNG encoding, the same zlib level 6 on both sides, dominates here; the 50x target is defined "
              "on in-memory pages: run without --png)")
    else:
        verdict = "meets" if base / clean >= 50 else "MISSES"
        print(f"target: clean >= 50x matplotlib per page on one core -> {base / clean:.1f}x ({verdict})")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
