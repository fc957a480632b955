"""The tracing's own measurements for a report: from a WFDB record, a store record, or a page already read.

Why here and not in each caller: the single-report CLI and the batch review's loader take the same path
(`rag_ecg.measure`), and a report must get its measurements or, when they fail, the reason — never an
exception that would cost the chart its retrieval report. The dict is `Measurements.to_dict()` (the
`cli.py measure` JSON) plus `sex`, which picks the long-QTc threshold.
"""
from __future__ import annotations

from pathlib import Path
from collections.abc import Callable

import numpy as np
from PIL import Image

from rag_ecg.data.records import ECGRecord
from rag_ecg.measure import Measurements, measure_signal
from rag_ecg.measure.inputs import PAGE_FS, is_wfdb, measure_input, page_mv, read_record_mv
from rag_ecg.measure.result import failed
from rag_ecg.paper.digitize import Digitized
from rag_ecg.reader.measured import norm_sex



def _as_dict(m: Measurements, sex: str | None) -> dict:
    return {**m.to_dict(), "sex": norm_sex(sex)}


def quietly(name: str, take: Callable[[], dict]) -> dict:
    """`take()`, or the all-null measurement of `name` with the reason as its one-line `error`."""
    try:
        return take()
    except MemoryError:
        return {**failed(name, "too large to measure (out of memory)"), "sex": None}
    except Exception as exc:  # a measurement failure never costs the chart its report
        why = " ".join(str(exc).split()) or type(exc).__name__
        return {**failed(name, why[:300]), "sex": None}


def record_measurements(path: str | Path, name: str = "") -> dict:
    """A WFDB record (sex and age from its header, when it says)."""
    sig, fs, sex, age = read_record_mv(Path(path))
    return _as_dict(measure_signal(sig, fs, sex, age, input_name=name or str(path)), sex)


def signal_measurements(rec: ECGRecord, name: str = "") -> dict:
    """A record already read (a store case: sex and age from the store)."""
    return _as_dict(measure_signal(rec.signal_mv(), rec.fs, rec.sex, rec.age, input_name=name or rec.record_id),
                    rec.sex)


def page_measurements(page: Image.Image | np.ndarray, read: Digitized | None = None, name: str = "") -> dict:
    """A picture's page, measured from `read` (the digitiser's read of it, made here when not given) on the
    page's own millimetre scale: the same digitize -> calibrate -> to_millivolts path as `cli.py measure`."""
    arr = np.asarray(page.convert("RGB") if isinstance(page, Image.Image) else page)
    return _as_dict(measure_signal(page_mv(arr, read), PAGE_FS, input_name=name), None)


def query_measurements(path: str | Path, sex: str | None = None, age: float | None = None) -> dict:
    """What `cli.py report` measures for its query: a WFDB record or a picture file (never raises). `sex` and
    `age` (the patient's, when the user gives them) override a record's header; a picture carries neither."""
    path = Path(path)
    if is_wfdb(path) and sex is None and age is None:
        return quietly(str(path), lambda: record_measurements(path))

    def measured() -> dict:
        header_sex = read_record_mv(path)[2] if is_wfdb(path) and sex is None else None
        return _as_dict(measure_input(path, sex=sex, age=age), sex or header_sex)
    return quietly(str(path), measured)
