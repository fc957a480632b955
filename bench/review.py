"""Batch review throughput: charts/s of `review()` (retrieval backend) and the share of time per stage.

Why: a backlog is reviewed overnight on whatever machine is free; the target is >= 10 charts/s on 2 CPU
cores with the retrieval backend. The charts are real PTB-XL records drawn with the `photo` preset and saved
as JPEG into a temp folder first (rendering is not counted). The baseline, measured in the same run on the
first `--baseline` of those charts (a CSV list, so a separate job), is the same review with what makes it
fast switched off: one chart per batch (forward pass, search, commit) and no loader processes.

Without `--index`, a reference library is built first: the first `--library` PTB-XL records ingested into a
temp SQLite store and indexed with the tiny random-init encoder `ecg-clip-tiny` (nothing downloaded).
With an untrained encoder most photos fall below the calibrated not-an-ECG floor (they are recorded as
errors after embedding and search, so they skip only the sub-millisecond retrieval report); the printed
status counts say how many.

    python bench/review.py                       # 500 charts, tiny index built here
    python bench/review.py --n 100 --baseline 30  # quick
    python bench/review.py --index index/default --db sqlite:///data/rag_ecg.db   (adds two jobs to that store)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index.build import BuildConfig, build_index  # noqa: E402
from index.ingest import ingest  # noqa: E402
from rag_ecg import paths  # noqa: E402
from rag_ecg.data.records import read_wfdb  # noqa: E402
from rag_ecg.data.store import open_store  # noqa: E402
from rag_ecg.encoder.model import ECGEncoder  # noqa: E402
from rag_ecg.paper.render import render_page  # noqa: E402
from rag_ecg.review.run import review  # noqa: E402


def _render_one(args) -> str:
    rec, out, preset, seed, dpi = args
    render_page(read_wfdb(rec), preset=preset, seed=seed, dpi=dpi).save(out, "JPEG", quality=88)
    return out


def render_charts(records: list[Path], folder: Path, preset: str, dpi: int, workers: int) -> list[Path]:
    """Draw each record as a page with `preset` artifacts and save it as JPEG (not timed)."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(r), str(folder / f"{r.stem}.jpg"), preset, i, dpi) for i, r in enumerate(records)]
    todo = [j for j in jobs if not Path(j[1]).exists()]
    with ProcessPoolExecutor(max(1, workers)) as pool:
        list(pool.map(_render_one, todo, chunksize=4))
    return [Path(j[1]) for j in jobs]


def build_library(root: Path, shared: Path, n: int, workers: int):
    """A temp store with the first `n` PTB-XL records and a tiny-encoder index over its training split."""
    store = open_store(f"sqlite:///{root / 'library.db'}")
    if (root / "index" / "manifest.json").exists():  # built by an earlier run in this --workdir
        return store, root / "index"
    ingest(store, "ptbxl", shared / "ptbxl", limit=n, progress=False)
    ECGEncoder.create("ecg-clip-tiny", seed=0).save(root / "encoder")
    index = build_index(store, root / "encoder", name="bench-review", out_dir=root / "index",
                        cfg=BuildConfig(workers=workers, page_width=400), progress=False)
    return store, index


def listing(charts: list[Path], csv_path: Path) -> Path:
    """A CSV list of the charts named after this run: every bench run is a new review job."""
    csv_path.write_text("path\n" + "".join(f"{c.name}\n" for c in charts))  # relative to the CSV's folder
    return csv_path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500, help="charts to review")
    ap.add_argument("--baseline", type=int, default=100, help="charts for the naive baseline loop")
    ap.add_argument("--index", type=Path, help="a built index folder (default: build a tiny one here)")
    ap.add_argument("--db", help="the case store the index was built from (with --index)")
    ap.add_argument("--library", type=int, default=200, help="PTB-XL records in the library built here")
    ap.add_argument("--workers", type=int, default=2, help="loader processes")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--preset", default="photo", help="artifact preset of the query charts")
    ap.add_argument("--dpi", type=int, default=100, help="resolution the charts are drawn at")
    ap.add_argument("--engine", default="local", choices=("local", "ray"))
    ap.add_argument("--workdir", type=Path, help="keep the charts, library and outputs here (reused)")
    args = ap.parse_args(argv)

    shared = paths.shared_data_dir()
    records = sorted((shared / "ptbxl" / "records100").glob("*.hea"), key=lambda p: int(p.stem.split("_")[0]))
    if not records:
        raise SystemExit(f"no PTB-XL records under {shared / 'ptbxl'} (set RAG_ECG_SHARED_DATA)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rag-ecg-bench-review-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if args.index:
        store, index = open_store(args.db), args.index
        queries = records[-args.n:]
    else:
        store, index = build_library(work, shared, args.library, args.workers)
        queries = records[args.library:][: args.n]  # records the library has never seen
    setup_s = time.perf_counter() - t
    t = time.perf_counter()
    charts = render_charts(queries, work / "charts", args.preset, args.dpi, args.workers)
    render_s = time.perf_counter() - t
    print(f"library ready in {setup_s:.1f}s; {len(charts)} {args.preset} charts rendered in {render_s:.1f}s "
          f"(neither counted) -> {work}")

    run = time.strftime("%Y%m%d-%H%M%S")
    t = time.perf_counter()
    s = review(listing(charts, work / "charts" / f"run-{run}.csv"), work / f"out-{run}", store=store,
               index_dir=index, workers=args.workers, batch_size=args.batch_size, engine=args.engine,
               progress=True)
    wall = time.perf_counter() - t
    base_n = min(args.baseline, len(charts))
    b = review(listing(charts[:base_n], work / "charts" / f"baseline-{run}.csv"), work / f"out-baseline-{run}",
               store=store, index_dir=index, workers=1, batch_size=1, engine="local", progress=False)
    base_rate = b.charts_per_s

    stage_total = sum(s.stage_s.values()) or 1.0
    result = {
        "charts": s.total, "done": s.done, "error": s.error, "pending": s.pending,
        "charts_per_s": round(s.charts_per_s, 2), "processing_s": s.elapsed_s,
        "wall_s_with_outputs": round(wall, 2), "outputs_s": round(wall - s.elapsed_s, 2),
        "stage_share": {k: round(v / stage_total, 3) for k, v in s.stage_s.items()},
        "stage_ms_per_chart": {k: round(1000 * v / max(1, s.processed), 2) for k, v in s.stage_s.items()},
        "baseline_charts": base_n, "baseline_charts_per_s": round(base_rate, 2),
        "speedup_vs_baseline": round(s.charts_per_s / base_rate, 2) if base_rate else None,
        "baseline_stage_ms_per_chart": {k: round(1000 * v / max(1, b.processed), 2) for k, v in b.stage_s.items()},
        "workers": args.workers, "batch_size": args.batch_size, "engine": args.engine, "cpus": os.cpu_count(),
        "target_charts_per_s": 10.0, "meets_target": s.charts_per_s >= 10.0,
    }
    print(f"\nreview: {s.total} charts ({s.done} done, {s.error} error) in {s.elapsed_s:.1f}s = "
          f"{s.charts_per_s:.1f} charts/s  [target >= 10 on 2 cores: {'met' if result['meets_target'] else 'NOT met'}]")
    print(f"  + outputs (CSV/JSONL/HTML, neighbour thumbnails) {result['outputs_s']:.1f}s")
    print("  stage share of per-chart time: " + ", ".join(f"{k} {v:.0%}" for k, v in result["stage_share"].items()))
    print("  ms per chart: " + ", ".join(f"{k} {v:.1f}" for k, v in result["stage_ms_per_chart"].items()))
    print(f"baseline (same review, one chart at a time in one process, {base_n} charts): {base_rate:.1f} "
          f"charts/s -> speed-up x{result['speedup_vs_baseline']}")
    print("  ms per chart: " + ", ".join(f"{k} {v:.1f}" for k, v in result["baseline_stage_ms_per_chart"].items()))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
