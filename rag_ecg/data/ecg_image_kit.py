"""The ECG-Image-Kit pages in ../shared/data/ecg-image-kit/: pages another renderer drew, with their truth.

Why: a digitiser tuned on its own renderer's pages can look good and still read other pages poorly; these pages
(ECG-Image-Kit, the PhysioNet Challenge 2024 generator, from PTB-XL records of folds 1-8) are the held-out check.
Truth of a page = its WFDB record x 0.1 mV per unit, each lead where the page prints it (the generator's
`start_sample`/`end_sample` per lead), NaN elsewhere. For evaluation only: never train on them.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rag_ecg.data.records import STANDARD_LEADS, read_wfdb
from rag_ecg.errors import InputError


@dataclass
class KitPage:
    """One page: its picture, the generator's description and the record it was drawn from."""

    image: Path
    config: Path
    record: Path  # WFDB record path without extension
    preset: str  # "clean" | "wrinkles+augment"

    def truth(self) -> tuple[np.ndarray, float]:
        """((12, n) mV with NaN where the page does not print the lead, sampling rate) of the page's record."""
        rec = read_wfdb(self.record)
        mv = rec.signal_mv()
        desc = json.loads(self.config.read_text())
        out = np.full((12, mv.shape[0]), np.nan, np.float32)
        for lead in desc["leads"]:
            i = STANDARD_LEADS.index(_lead_name(lead["lead_name"]))
            a, b = int(lead["start_sample"]), min(mv.shape[0], int(lead["end_sample"]))
            out[i, a:b] = mv[a:b, i]
        return out, float(rec.fs)

    def layout(self) -> str:
        """The layout in rag-ecg's names ("3x4+II" for four columns and a full-length rhythm strip)."""
        desc = json.loads(self.config.read_text())
        full = desc.get("full_mode_lead")
        cols = int(desc.get("number_of_columns_in_image", 4))
        return {4: "3x4", 2: "6x2", 1: "12x1"}.get(cols, f"{cols}cols") + (f"+{full}" if full and full != "None" else "")


def read_kit_pages(root: str | Path) -> list[KitPage]:
    """The pages listed in `root`/index.csv (paths inside the shared data folder)."""
    root = Path(root)
    index = root / "index.csv"
    if not index.is_file():
        raise InputError(f"{index}: no ECG-Image-Kit index (expected ../shared/data/ecg-image-kit/index.csv)")
    data = root.parent
    with index.open(newline="") as f:
        return [KitPage(root / r["page"], root / r["config"], data / "ptbxl" / r["record"].removeprefix("ptbxl/"),
                        r["preset"]) for r in csv.DictReader(f)]


def _lead_name(name: str) -> str:
    low = {ld.lower(): ld for ld in STANDARD_LEADS}
    return low[name.strip().lower()]
