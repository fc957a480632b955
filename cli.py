"""rag-ecg command line: the one entry point (`python cli.py --help`).

Each command is a thin typed wrapper over a job in `index/` or `training/` or a library call in `rag_ecg/`.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on (or reach for) a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from rag_ecg import paths

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Interpret ECG images by retrieving similar past cases.")
console = Console()
err = Console(stderr=True)

DbOpt = typer.Option(None, "--db", help="SQLAlchemy URL of the case store "
                     "(default: $RAG_ECG_DB or a SQLite file under ./data).")


def _store(db: Optional[str]):
    from rag_ecg.store import open_store

    try:
        return open_store(db)
    except RuntimeError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2)


def print_summary(store) -> None:
    from rag_ecg.records import SUPERCLASSES
    from rag_ecg.store import summary

    s = summary(store)
    table = Table(title=f"case store: {s['total']} cases")
    table.add_column("source")
    table.add_column("cases", justify="right")
    for lab in (*SUPERCLASSES, "(none)"):
        table.add_column(lab, justify="right")
    for source, n in sorted(s["by_source"].items()):
        per = s["by_label"].get(source, {})
        table.add_row(source, str(n), *[str(per.get(lab, 0)) for lab in (*SUPERCLASSES, "(none)")])
    console.print(table)
    splits = ", ".join(f"{k} {v}" for k, v in sorted(s["by_split"].items()))
    console.print(f"splits: {splits}")


@app.command()
def ingest(source: str = typer.Argument(..., help="ptbxl | ludb | wfdb (any folder of WFDB records)"),
           path: Path = typer.Argument(..., help="dataset folder (or one .hea for wfdb)"),
           db: Optional[str] = DbOpt,
           batch_size: int = typer.Option(64, help="records per transaction"),
           limit: Optional[int] = typer.Option(None, help="ingest only the first N records")) -> None:
    """Read WFDB records with their reports and labels into the case store (idempotent)."""
    from index.ingest import ingest as run_ingest

    store = _store(db)
    try:
        res = run_ingest(store, source, path, batch_size=batch_size, limit=limit,
                         log=lambda m: err.print(f"[yellow]{m}[/]", markup=True, highlight=False))
    except (ValueError, FileNotFoundError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2)
    console.print(f"{source}: {res.seen} records read, {res.inserted} new, {res.updated} updated, "
                  f"{len(res.skipped)} skipped")
    print_summary(store)


@app.command()
def stats(db: Optional[str] = DbOpt) -> None:
    """Print what the case store holds (counts per source, superclass and split)."""
    print_summary(_store(db))


@app.command()
def quickstart(data: Path = typer.Option(None, help="folder holding ptbxl/ and/or ludb/ "
                                         "(default: ../shared/data)"),
               db: Optional[str] = DbOpt) -> None:
    """The end-to-end demo on the embedded defaults: ingest the real data and summarise it."""
    from index.ingest import ingest as run_ingest

    data = data or paths.shared_data_dir()
    store = _store(db)
    found = [(name, data / name) for name in ("ptbxl", "ludb") if (data / name).is_dir()]
    if not found:
        err.print(f"[red]error:[/] {data}: no ptbxl/ or ludb/ folder (pass --data)")
        raise typer.Exit(2)
    for name, folder in found:
        res = run_ingest(store, name, folder, log=lambda m: err.print(m, highlight=False))
        console.print(f"{name}: {res.inserted} new, {res.updated} updated, {len(res.skipped)} skipped")
    print_summary(store)


if __name__ == "__main__":
    sys.exit(app())
