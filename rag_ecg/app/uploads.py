"""What a web-app user hands in: uploaded files (a picture, a PDF, or a WFDB record's .hea + .dat) or a named
example, turned into one query file on disk for the same readers the CLI uses.

Why a module: uploads are the untrusted edge of the web app. Names are reduced to a plain file name (no folders,
no dot-files, no control characters), so a file can only land in the request's own scratch folder; what a file
*is* is left to the one loader (`rag_ecg.data.images`, `read_wfdb`), so an upload gets exactly the one-line error
the CLI prints for the same file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rag_ecg import paths
from rag_ecg.data.images import FORMATS, IMAGE_SUFFIXES
from rag_ecg.errors import InputError
from rag_ecg.io import atomic_write

MAX_FILES = 4  # a picture, or a WFDB record's .hea + .dat (+ an annotation file people select along)
EXAMPLE_SUFFIXES = IMAGE_SUFFIXES  # the examples offered: real pictures under ../shared/data/real-pictures
EXAMPLES_PER_FOLDER = 4


class UploadError(InputError):
    """An upload that cannot be a query (no file, several pictures, a lone .hea); one line, like the CLI's."""


@dataclass(frozen=True)
class UploadedFile:
    """One file of a request, as sent: the name the user's machine gave it and its bytes."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Example:
    """A picture offered on the start page: `key` is what the form sends back (never a path)."""

    key: str
    path: Path


def clean_name(name: str) -> str:
    """A plain file name for an upload's name: the last path part (browsers on Windows send `C:\\...\\x.png`),
    control characters dropped; refused when nothing usable is left or it is a dot-file."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    if not base or base in (".", "..") or base.startswith("."):
        raise UploadError(f"{base or 'upload'}: not a usable file name (choose a picture, PDF or WFDB record)")
    return base[:200]


def save_upload(files: list[UploadedFile], folder: Path) -> Path:
    """Write the request's files into `folder` (the request's own scratch folder) and return the query: the
    picture, or the .hea of a WFDB record (its .dat must come along). Raises UploadError for what cannot be
    one query; whether a file is a readable ECG is for the loaders to say."""
    files = [f for f in files if f.name or f.data]
    if not files:
        raise UploadError(f"no file chosen: upload an ECG picture ({FORMATS}) or a WFDB record (.hea + .dat)")
    if len(files) > MAX_FILES:
        raise UploadError(f"{len(files)} files: upload one picture, or one WFDB record's .hea and .dat")
    names = [clean_name(f.name) for f in files]
    if len(set(names)) != len(names):
        raise UploadError(f"{', '.join(names)}: the same file name twice")
    heads = [n for n in names if n.lower().endswith(".hea")]
    if len(heads) > 1:
        raise UploadError(f"{', '.join(heads)}: several WFDB records; upload one at a time")
    if heads:
        stem = heads[0][:-4]
        if not any(n != heads[0] and n.startswith(stem + ".") for n in names):
            raise UploadError(f"{heads[0]}: a WFDB record needs its signal file too: choose {stem}.hea and "
                              f"{stem}.dat together")
        others = [n for n in names if not n.startswith(stem + ".")]
        if others:
            raise UploadError(f"{', '.join(others)}: not part of the WFDB record {stem}; upload one ECG at a time")
    elif len(names) > 1:
        raise UploadError(f"{', '.join(names)}: {len(names)} files; upload one picture at a time")
    folder.mkdir(parents=True, exist_ok=True)
    for name, f in zip(names, files):
        atomic_write(folder / name, f.data)
    return folder / (heads[0] if heads else names[0])


def is_record(path: Path) -> bool:
    """A WFDB record query (its .hea), as opposed to a picture or PDF."""
    return path.suffix.lower() == ".hea"


def list_examples(root: Path | None = None, per_folder: int = EXAMPLES_PER_FOLDER) -> list[Example]:
    """A few real pictures to try, from each folder of `../shared/data/real-pictures` (none when absent)."""
    root = Path(root) if root is not None else paths.shared_data_dir() / "real-pictures"
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        pics = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXAMPLE_SUFFIXES)
        out.extend(Example(f"{folder.name}/{p.name}", p) for p in pics[:per_folder])
    return out


def pick_example(key: str, examples: list[Example]) -> Example:
    """The offered example the form named; anything else (a path someone typed in) is refused."""
    for ex in examples:
        if ex.key == key:
            return ex
    raise UploadError(f"{key[:80]}: not one of the examples offered")
