"""Make a trained encoder the one the package ships (`rag_ecg/encoder/weights/`).

    python training/ship_encoder.py runs/encoder-ship/encoder [--db URL] [--figures figures.json]

Keeps the token rows that the store's case texts and the SCP statement vocabulary use (see
`rag_ecg.encoder.shipped`), and records how to make it again: the recipe's command and resolved config, the
training data hash, and the figures measured with it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataclasses

import torch
from sqlalchemy import select

from rag_ecg.data.store import Case, Store, scp_descriptions
from rag_ecg.encoder.shipped import SHIPPED_DIR, compact
from rag_ecg.encoder.text import case_text
from rag_ecg.encoder.text import Tokenizer
from rag_ecg.redact import redact
from training.encoder_config import load_config

COMMAND = "python cli.py train-encoder --config training/configs/encoder_ship.yaml"


def used_tokens(store: Store) -> set[int]:
    """Every token id of every case text in the store and of every statement description."""
    with store.session() as s:
        descriptions = scp_descriptions(s)
        texts = [case_text(c.report, c.codes or {}, descriptions) for c in s.scalars(select(Case))]
    tokens = Tokenizer()(texts + list(descriptions.values()))
    return set(torch.unique(tokens).tolist())


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path, help="the run's final encoder folder (run_dir/encoder)")
    ap.add_argument("--db", default=None, help="case store the encoder was trained on (default: $RAG_ECG_DB)")
    ap.add_argument("--figures", type=Path, default=None, help="JSON of figures measured with it")
    ap.add_argument("--out", type=Path, default=SHIPPED_DIR)
    args = ap.parse_args(argv)
    store = Store(args.db)
    manifest = json.loads((args.checkpoint / "manifest.json").read_text())
    config_yaml = args.checkpoint.parent / "config.yaml"
    config = dataclasses.asdict(load_config(config_yaml)) if config_yaml.is_file() else {}
    for key in ("db", "run_dir", "progress"):
        config.pop(key, None)
    recipe = {"command": COMMAND, "config": redact(config), "training_data_hash": manifest.get("training_data_hash"),
              "figures": json.loads(args.figures.read_text()) if args.figures else {}}
    return compact(args.checkpoint, used_tokens(store), args.out, recipe)


if __name__ == "__main__":
    print(main())
