"""Render job: WFDB records (or loaded ECGRecords) -> paper-ECG PNGs + layout JSON, on all cores.

Why a job: demo sets, reviewer packs and digitisation ground truth need many pages on disk; each page is
independent, so records are spread over worker processes (one OpenCV thread each) and every file is
written atomically (a stopped run never leaves half a PNG). Output names come from the record ids; each
page's seed is derived from (seed, position), so a re-run writes identical files.
"""
from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from rag_ecg.data.records import (ECGRecord, RecordError, find_wfdb_records, ptbxl_record, read_ludb, read_ptbxl_index,
                             read_wfdb)
from rag_ecg.data.images import save_image
from rag_ecg.errors import InputError
from rag_ecg.io import atomic_write
from rag_ecg.paper.layout import LAYOUTS, RenderConfig
from rag_ecg.paper.presets import PRESETS
from rag_ecg.paper.render import render_page_and_layout

log = logging.getLogger(__name__)


def render_many(record_paths_or_records: Iterable[ECGRecord | str | Path], out_dir: str | Path,
                layout: str | None = "3x4+II", preset: str = "clean", seed: int = 0, workers: int = 0,
                dpi: int = 200, image_format: str = "png", progress: bool = True, strict: bool = False) -> list[Path]:
    """Render each record to `<out_dir>/<name>.png` + `<name>.json` (layout); returns the image paths in order.

    Items: ECGRecords, WFDB record paths (with or without `.hea`) or folders of them. `layout=None` with
    preset "random" draws a random page layout per record. `workers=0` uses every core. Records that fail
    are logged (warning) and skipped (`strict=True`: raise instead). `image_format` "jpg" keeps
    photo/scan presets small (their noise makes PNGs of several MB at 200 dpi).
    """
    if preset not in PRESETS:
        raise InputError(f"preset {preset!r} is not one of {', '.join(PRESETS)}")
    if image_format not in _SAVE_OPTIONS:
        raise InputError(f"image_format {image_format!r} is not one of {', '.join(_SAVE_OPTIONS)}")
    if layout is not None and layout not in LAYOUTS:
        raise InputError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    items: list[ECGRecord | Path] = []
    for it in record_paths_or_records:
        if isinstance(it, ECGRecord):
            items.append(it)
        elif Path(it).is_dir():
            found = find_wfdb_records(it)
            if not found:
                raise RecordError(f"{it}: no WFDB records (.hea) found")
            items.extend(found)
        else:
            items.append(Path(it))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _unique_names(items)
    seeds = [int(s) for s in np.random.SeedSequence(int(seed) & 0xFFFFFFFF).generate_state(max(1, len(items)))]
    jobs = [(it, out_dir / f"{nm}.{image_format}", layout, preset, sd, dpi) for it, nm, sd in zip(items, names, seeds)]
    workers = workers or os.cpu_count() or 1
    results: list[tuple[Path | None, str | None]] = []
    with Progress(TextColumn("render"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not progress, transient=False) as bar:
        task = bar.add_task("render", total=len(jobs))
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
                for r in pool.map(_render_one, jobs, chunksize=max(1, min(8, len(jobs) // (4 * workers)))):
                    results.append(r)
                    bar.advance(task)
        else:
            for j in jobs:
                results.append(_render_one(j))
                bar.advance(task)
    done = []
    for path, err in results:
        if err:
            if strict:
                raise RecordError(err)
            log.warning("skipped: %s", err)
        else:
            done.append(path)
    return done


_SAVE_OPTIONS = {"png": {"compress_level": 3}, "jpg": {"quality": 90}}


def _render_one(job) -> tuple[Path | None, str | None]:
    item, png, layout, preset, seed, dpi = job
    try:
        rec = item if isinstance(item, ECGRecord) else read_record(item)
        config = None if (layout is None and preset == "random") else RenderConfig(layout=layout or "3x4+II", dpi=dpi)
        image, result = render_page_and_layout(rec, preset=preset, seed=seed, config=config, dpi=dpi)
        save_image(image, png, **_SAVE_OPTIONS[png.suffix[1:]])
        meta = {**result.layout_json(), "preset": preset, "seed": seed}
        if preset != "clean":
            meta["note"] = "boxes are those of the clean page; artifacts may move or hide content"
        atomic_write(png.with_suffix(".json"), json.dumps(meta, indent=1))
        return png, None
    except (RecordError, ValueError, OSError) as exc:
        rid = item.record_id if isinstance(item, ECGRecord) else str(item)
        msg = str(exc)
        named = msg.split(":", 1)[0] in (rid, Path(rid).name, Path(rid).with_suffix("").name)
        return None, msg if named else f"{rid}: {msg}"


def read_record(path: str | Path) -> ECGRecord:
    """A WFDB record with its dataset metadata: PTB-XL (age, sex, report from the CSV), LUDB, or plain."""
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".hea", ".dat") else base
    for root in (base.parent.parent, base.parent):
        if (root / "ptbxl_database.csv").exists():
            rows = _ptbxl_rows(str(root))
            row = rows.get(str(base.relative_to(root)))
            if row is not None:
                return ptbxl_record(row)
    hea = base.with_suffix(".hea")
    if hea.exists() and "<age>:" in hea.read_text(errors="replace"):
        return read_ludb(base)
    return read_wfdb(base)


@lru_cache(maxsize=4)
def _ptbxl_rows(root: str) -> dict:
    rows, _ = read_ptbxl_index(root)
    return {str(r.record_path.relative_to(Path(root))): r for r in rows}


def _unique_names(items: list) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for it in items:
        raw = it.record_id if isinstance(it, ECGRecord) else Path(it).with_suffix("").name
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("._") or "record"
        n = seen.get(name, 0)
        seen[name] = n + 1
        out.append(name if n == 0 else f"{name}-{n}")
    return out

