"""The ECG record type and its readers (any WFDB record, PTB-XL layout, LUDB layout).

Every record that enters rag-ecg passes through `validate`, so downstream code (renderer, encoder,
store) can rely on: 12 standard leads in standard order, float32 (samples, leads), finite values,
a plausible sampling rate and duration, and an explicit unit with its factor to millivolts.

Reading is bounded by the header, checked before any signal is read: at most `MAX_SECONDS` of a longer
(Holter) record are read, at most `MAX_SIGNALS` channels and `MAX_HEADER_BYTES` of header are accepted,
and a header may only name signal files inside its own folder (no absolute path, no `..`).
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import wfdb

from rag_ecg.data.labels import ScpStatement, ludb_superclasses, parse_scp_codes, read_scp_statements, superclasses_for
from rag_ecg.errors import InputError

STANDARD_LEADS: tuple[str, ...] = (
    "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
)

# Millivolts per unit. `NU` is the z-scored, band-passed unit of the shared PTB-XL copy: one per-lead
# standard deviation, rendered with a nominal 0.1 mV (see ../shared/data/README.md).
MV_PER_UNIT: dict[str, float] = {"mV": 1.0, "uV": 1e-3, "V": 1e3, "NU": 0.1}

MIN_FS, MAX_FS = 50.0, 20000.0
MIN_SECONDS = 2.5  # one column of a 3x4 print; shorter cannot make a standard page
FLAT_PTP_MV = 0.01  # a lead whose whole trace spans less than 10 µV carries no ECG
MAX_SECONDS = 60.0  # a longer record (a 24-h Holter) is read up to here only: pages and windows use 10 s
MAX_SIGNALS = 64  # channels a header may declare (12 leads plus any extra channels)
MAX_HEADER_BYTES = 1 << 20  # a .hea is a few hundred bytes of text

_LEAD_ALIASES = {name.lower(): name for name in STANDARD_LEADS}
_LEAD_ALIASES.update({"d1": "I", "d2": "II", "d3": "III", "lead i": "I", "lead ii": "II",
                      "lead iii": "III", "mlii": "II"})


class RecordError(InputError):
    """A record that cannot be used; the message names the record and the problem."""


@dataclass
class ECGRecord:
    """One 12-lead ECG: signal (samples, leads) float32 in `units`, with its clinical metadata."""

    record_id: str
    signal: np.ndarray
    fs: float
    leads: list[str]
    units: str = "mV"
    source: str = "wfdb"
    patient_id: str | None = None
    age: float | None = None
    sex: str | None = None  # "M" | "F" | None
    report: str = ""
    codes: dict[str, float] = field(default_factory=dict)  # SCP-ECG code -> likelihood (0-100)
    labels: list[str] = field(default_factory=list)  # diagnostic superclasses, SUPERCLASSES order
    fold: int | None = None
    path: str | None = None  # WFDB record path without extension
    extra: dict = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return self.signal.shape[0] / self.fs

    @property
    def mv_per_unit(self) -> float:
        return MV_PER_UNIT[self.units]

    def signal_mv(self) -> np.ndarray:
        """(samples, leads) float32 in millivolts (nominal for `NU` signals)."""
        return (self.signal * np.float32(self.mv_per_unit)).astype(np.float32, copy=False)

    def lead(self, name: str) -> np.ndarray:
        return self.signal[:, self.leads.index(normalize_lead_name(name))]


def normalize_lead_name(name: str) -> str:
    """'AVR', 'avr', 'aVR', ' v1 ' -> the standard spelling; unknown names are returned stripped."""
    key = re.sub(r"\s+", " ", str(name).strip().lower())
    return _LEAD_ALIASES.get(key, str(name).strip())


def normalize_units(unit: str | None, record_id: str) -> str:
    u = (unit or "").strip()
    table = {"mv": "mV", "uv": "uV", "µv": "uV", "v": "V", "nu": "NU"}
    if u.lower() not in table:
        raise RecordError(f"{record_id}: unknown signal unit {unit!r} (expected mV, uV, V or NU)")
    return table[u.lower()]


def validate(rec: ECGRecord) -> ECGRecord:
    """Check and canonicalise a record; raise RecordError with one clear line otherwise."""
    rid = rec.record_id
    sig = np.asarray(rec.signal)
    if sig.ndim != 2:
        raise RecordError(f"{rid}: signal must be 2-D (samples, leads), got shape {sig.shape}")
    if not np.isfinite(rec.fs) or not (MIN_FS <= rec.fs <= MAX_FS):
        raise RecordError(f"{rid}: sampling rate {rec.fs:g} Hz is outside {MIN_FS:g}-{MAX_FS:g} Hz")
    names = [normalize_lead_name(n) for n in rec.leads]
    if len(names) != sig.shape[1]:
        raise RecordError(f"{rid}: {len(names)} lead names for {sig.shape[1]} signal columns")
    missing = [ld for ld in STANDARD_LEADS if ld not in names]
    if missing:
        raise RecordError(f"{rid}: not a standard 12-lead set: missing {', '.join(missing)} "
                          f"(has {', '.join(names)})")
    if len(set(names)) != len(names):
        raise RecordError(f"{rid}: duplicate lead names {names}")
    order = [names.index(ld) for ld in STANDARD_LEADS]
    sig = sig[:, order].astype(np.float32)
    if rec.signal.shape[0] / rec.fs < MIN_SECONDS:
        raise RecordError(f"{rid}: only {rec.signal.shape[0] / rec.fs:.2f} s of signal "
                          f"(at least {MIN_SECONDS} s needed)")
    bad = [ld for ld, ok in zip(STANDARD_LEADS, np.isfinite(sig).all(axis=0)) if not ok]
    if bad:
        raise RecordError(f"{rid}: NaN/infinite samples in lead(s) {', '.join(bad)}")
    ptp_mv = np.ptp(sig, axis=0) * MV_PER_UNIT[rec.units]
    flat = [ld for ld, p in zip(STANDARD_LEADS, ptp_mv) if p < FLAT_PTP_MV]
    if flat:
        raise RecordError(f"{rid}: flat-lined lead(s) {', '.join(flat)} (no signal)")
    return replace(rec, signal=np.ascontiguousarray(sig), leads=list(STANDARD_LEADS))


def read_wfdb(path: str | Path, record_id: str | None = None, source: str = "wfdb") -> ECGRecord:
    """Read any WFDB record wfdb can read (path without extension); validated."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix in {".hea", ".dat"} else path
    rid = record_id or base.name
    hea = base.with_suffix(".hea")
    if not hea.exists():
        raise RecordError(f"{rid}: no WFDB header at {base}.hea")
    _check_header_text(hea, rid)
    header = _read_header(base, rid)
    _check_header(header, base, rid)
    _check_signal_files(header, base, rid)
    total = int(header.sig_len or 0)
    sampto = int(MAX_SECONDS * float(header.fs))
    sampto = sampto if 0 < sampto < total else None  # read only the first MAX_SECONDS of a longer record
    try:
        rec = wfdb.rdrecord(str(base), sampto=sampto)
    except FileNotFoundError as exc:
        raise RecordError(f"{rid}: signal file missing ({Path(exc.filename or '').name or exc})") from None
    except Exception as exc:
        raise RecordError(f"{rid}: unreadable WFDB signal ({_short(exc)})") from None
    if rec.p_signal is None:
        raise RecordError(f"{rid}: record has no signal")
    expected = sampto or total
    if expected and rec.p_signal.shape[0] != expected:
        raise RecordError(f"{rid}: header says {expected} samples but the signal file holds "
                          f"{rec.p_signal.shape[0]} (truncated .dat?)")
    units = {normalize_units(u, rid) for u in (rec.units or ["mV"])}
    if len(units) != 1:
        raise RecordError(f"{rid}: mixed signal units {sorted(units)}")
    extra: dict = {"comments": list(rec.comments or [])}
    if sampto:
        extra["seconds_in_file"] = round(total / float(rec.fs), 3)  # the record was read up to MAX_SECONDS
    return validate(ECGRecord(
        record_id=rid, signal=rec.p_signal[: int(MAX_SECONDS * float(rec.fs)) or None], fs=float(rec.fs),
        leads=list(rec.sig_name), units=units.pop(), source=source, path=str(base), extra=extra,
    ))


def _read_header(base: Path, rid: str, what: str = "WFDB header"):
    try:
        return wfdb.rdheader(str(base))
    except Exception as exc:  # wfdb raises many types for broken headers
        raise RecordError(f"{rid}: unreadable {what} ({_short(exc)})") from None


def _check_header(header, base: Path, rid: str) -> None:
    """Refuse, before any signal is read, what the header says that we will not read."""
    fs = float(header.fs or 0)
    if not np.isfinite(fs) or not (MIN_FS <= fs <= MAX_FS):
        raise RecordError(f"{rid}: sampling rate {fs:g} Hz is outside {MIN_FS:g}-{MAX_FS:g} Hz")
    if int(header.n_sig or 0) > MAX_SIGNALS:
        raise RecordError(f"{rid}: header declares {header.n_sig} signals (at most {MAX_SIGNALS})")
    for seg in getattr(header, "seg_name", None) or []:  # a multi-segment record: each segment's header too
        if seg != "~":
            _check_header_text(base.parent / f"{seg}.hea", rid)
            seg_header = _read_header(base.parent / seg, rid, f"segment header {seg}")
            if getattr(seg_header, "seg_name", None):
                raise RecordError(f"{rid}: segment {seg} is itself a multi-segment record")
            _check_header(seg_header, base, rid)


def _check_header_text(hea: Path, rid: str) -> None:
    """Size, then every file a header names (first field of each signal/segment line), before wfdb parses it:
    a header may only name files in its own folder, never an absolute path or one that climbs out."""
    if not hea.exists():
        raise RecordError(f"{rid}: no WFDB header at {hea}")
    size = hea.stat().st_size
    if size > MAX_HEADER_BYTES:
        raise RecordError(f"{rid}: {hea.name} is {size} bytes, not a WFDB header (at most {MAX_HEADER_BYTES})")
    lines = [ln for ln in hea.read_text(encoding="latin-1").splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    for line in lines[1:]:
        name = line.split()[0]
        parts = re.split(r"[/\\]", name)
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
            raise RecordError(f"{rid}: {hea.name} names a signal file outside its folder ({name!r})")


# Bytes per sample of the common WFDB storage formats (for the truncation check before reading).
_FMT_BYTES = {"8": 1, "16": 2, "61": 2, "80": 1, "160": 2, "212": 1.5, "24": 3, "32": 4, "310": 4 / 3,
              "311": 4 / 3}


def _check_signal_files(header, base: Path, rid: str) -> None:
    """Say 'truncated' or 'missing' plainly, instead of wfdb's 'Samples were not loaded correctly'."""
    per_file: dict[str, list[str]] = {}
    for fname, fmt in zip(getattr(header, "file_name", None) or [], getattr(header, "fmt", None) or []):
        per_file.setdefault(fname, []).append(str(fmt))
    for fname, fmts in per_file.items():
        f = base.parent / fname
        if not f.exists():
            raise RecordError(f"{rid}: signal file missing ({fname})")
        if any(fm not in _FMT_BYTES for fm in fmts) or not header.sig_len:
            continue  # compressed/unusual formats: let wfdb judge
        offset = max(int(b or 0) for b in (header.byte_offset or [0]))
        need = offset + header.sig_len * sum(_FMT_BYTES[fm] for fm in fmts)
        have = f.stat().st_size
        if have < int(need):
            held = int((have - offset) / sum(_FMT_BYTES[fm] for fm in fmts))
            raise RecordError(f"{rid}: header says {header.sig_len} samples but {fname} holds {held} "
                              f"(truncated .dat?)")


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


# ---------------------------------------------------------------- PTB-XL


@dataclass
class PtbxlRow:
    """Metadata of one PTB-XL ECG, before its signal is read."""

    ecg_id: str
    record_path: Path
    patient_id: str | None
    age: float | None
    sex: str | None
    report: str
    codes: dict[str, float]
    labels: list[str]
    fold: int | None


def read_ptbxl_index(root: str | Path) -> tuple[list[PtbxlRow], dict[str, ScpStatement]]:
    """Rows of `ptbxl_database.csv` with superclasses derived from `scp_statements.csv`."""
    root = Path(root)
    db = root / "ptbxl_database.csv"
    if not db.exists():
        raise RecordError(f"{root}: not a PTB-XL folder (no ptbxl_database.csv)")
    statements = read_scp_statements(root / "scp_statements.csv")
    rows = []
    with open(db, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            codes = parse_scp_codes(r["scp_codes"])
            rel = r.get("record") or r["filename_lr"]
            rows.append(PtbxlRow(
                ecg_id=str(int(float(r["ecg_id"]))), record_path=root / rel,
                patient_id=_id_or_none(r.get("patient_id")), age=_age(r.get("age")),
                sex={"0": "M", "1": "F"}.get(str(r.get("sex", "")).split(".")[0]),
                report=(r.get("report") or "").strip(), codes=codes,
                labels=superclasses_for(codes, statements),
                fold=int(float(r["strat_fold"])) if r.get("strat_fold") else None,
            ))
    return rows, statements


def ptbxl_record(row: PtbxlRow) -> ECGRecord:
    rec = read_wfdb(row.record_path, record_id=f"ptbxl:{row.ecg_id}", source="ptbxl")
    return replace(rec, patient_id=row.patient_id, age=row.age, sex=row.sex, report=row.report,
                   codes=row.codes, labels=row.labels, fold=row.fold)


def _id_or_none(v: str | None) -> str | None:
    if v is None or str(v).strip() == "":
        return None
    try:
        return str(int(float(v)))
    except ValueError:
        return str(v).strip()


def _age(v: str | None) -> float | None:
    try:
        a = float(v)
    except (TypeError, ValueError):
        return None
    # PTB-XL codes ages over 89 as 300 for privacy.
    return 90.0 if a >= 300 else a


# ---------------------------------------------------------------- LUDB

def read_ludb(path: str | Path, record_id: str | None = None) -> ECGRecord:
    """A LUDB record: raw mV, 500 Hz; age/sex/diagnoses from its header comments."""
    path = Path(path)
    rec = read_wfdb(path, record_id=record_id or f"ludb:{path.with_suffix('').name}", source="ludb")
    age, sex, diagnoses = None, None, []
    in_diag = False
    for c in rec.extra.get("comments", []):
        c = c.strip()
        if c.startswith("<age>:"):
            age = _age(c.split(":", 1)[1].strip())
        elif c.startswith("<sex>:"):
            sex = c.split(":", 1)[1].strip().upper()[:1] or None
        elif c.startswith("<diagnoses>"):
            in_diag = True
        elif in_diag and c:
            diagnoses.append(c.rstrip(". ").strip())
    report = ". ".join(diagnoses) + ("." if diagnoses else "")
    rhythm = next((d.split(":", 1)[1].strip() for d in diagnoses if d.lower().startswith("rhythm:")), None)
    return replace(rec, patient_id=rec.record_id, age=age, sex=sex if sex in ("M", "F") else None,
                   report=report, labels=ludb_superclasses(diagnoses),
                   extra={**rec.extra, "diagnoses": diagnoses, "rhythm": rhythm})


def find_wfdb_records(folder: str | Path) -> list[Path]:
    """Record paths (without extension) of every .hea under a folder, sorted."""
    return sorted(p.with_suffix("") for p in Path(folder).rglob("*.hea"))
