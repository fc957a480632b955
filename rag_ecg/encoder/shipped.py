"""The encoder that ships inside the package, so the first run needs no training.

A trained checkpoint is ~30 MB, almost all of it the text tower's 49,408-row token table, of which the
library's reports and statement texts use under a thousand rows (899 for PTB-XL + LUDB; texts are cut at 77
tokens). The shipped form keeps those rows (the others are zero: a token never seen in training has no learned
meaning anyway) and every tensor in float16: 3 MB,
`weights/encoder.safetensors` + `weights/encoder.json` (the checkpoint's manifest, the rows kept, the data
hash and the command that reproduces it). `default_encoder()` expands it once into an ordinary checkpoint
folder under the data folder; the bytes it writes are the same on every machine, so every index built from
it records the same encoder hash.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from rag_ecg import paths
from rag_ecg.encoder.checkpoint import AUX_WEIGHTS, MANIFEST, OPEN_CLIP_CONFIG, WEIGHTS, EncoderLoadError, weights_bytes
from rag_ecg.encoder.preprocess import preprocess_for
from rag_ecg.io import atomic_dir, atomic_write, json_text

SHIPPED_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED_WEIGHTS = "encoder.safetensors"
SHIPPED_MANIFEST = "encoder.json"
TOKEN_TABLE = "token_embedding.weight"
AUX_PREFIX = "aux_head."


def compact(checkpoint: str | Path, token_ids, out_dir: str | Path, recipe: dict) -> Path:
    """Write the shipped form of a checkpoint folder: kept token rows + float16 tensors + manifest.

    `token_ids`: every token id the library's texts (and the statement vocabulary) tokenise to.
    `recipe`: how to reproduce it (command, data hash, figures), stored in the manifest."""
    src = Path(checkpoint)
    manifest = json.loads((src / MANIFEST).read_text())
    state = st_load((src / WEIGHTS).read_bytes())
    if manifest.get("aux_head"):
        state.update({AUX_PREFIX + k: v for k, v in st_load((src / AUX_WEIGHTS).read_bytes()).items()})
    rows = torch.tensor(sorted({int(t) for t in token_ids}), dtype=torch.int64)
    table = state.pop(TOKEN_TABLE)
    packed = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    packed[TOKEN_TABLE + ".rows"] = rows
    packed[TOKEN_TABLE + ".kept"] = table[rows].half().contiguous()
    blob = st_save(packed)
    out = Path(out_dir)
    atomic_write(out / SHIPPED_WEIGHTS, blob)
    shipped = {"checkpoint_manifest": manifest, "vocab_size": int(table.shape[0]), "rows_kept": int(len(rows)),
               "sha256": hashlib.sha256(blob).hexdigest(), "recipe": recipe}
    atomic_write(out / SHIPPED_MANIFEST, json_text(shipped, indent=2, sort_keys=True))
    return out


def expand(shipped_dir: str | Path, dest: str | Path) -> Path:
    """The shipped form -> an ordinary checkpoint folder at `dest` (float32, full token table)."""
    d = Path(shipped_dir)
    info = json.loads((d / SHIPPED_MANIFEST).read_text())
    blob = (d / SHIPPED_WEIGHTS).read_bytes()
    if hashlib.sha256(blob).hexdigest() != info["sha256"]:
        raise EncoderLoadError(f"{d / SHIPPED_WEIGHTS}: sha256 does not match {SHIPPED_MANIFEST} (damaged install)")
    packed = st_load(blob)
    rows, kept = packed.pop(TOKEN_TABLE + ".rows"), packed.pop(TOKEN_TABLE + ".kept")
    table = torch.zeros((info["vocab_size"], kept.shape[1]), dtype=torch.float32)
    table[rows] = kept.float()
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in packed.items()}
    aux = {k[len(AUX_PREFIX):]: state.pop(k) for k in list(state) if k.startswith(AUX_PREFIX)}
    state[TOKEN_TABLE] = table
    manifest = dict(info["checkpoint_manifest"])
    cfg = manifest["model_cfg"]
    wblob = weights_bytes(state)
    manifest["weights_sha256"] = hashlib.sha256(wblob).hexdigest()
    manifest["shipped"] = {"sha256": info["sha256"], "rows_kept": info["rows_kept"], "recipe": info["recipe"]}
    with atomic_dir(dest) as tmp:
        atomic_write(tmp / WEIGHTS, wblob)
        if aux:
            ablob = weights_bytes(aux)
            atomic_write(tmp / AUX_WEIGHTS, ablob)
            manifest["aux_head"] = dict(manifest["aux_head"], sha256=hashlib.sha256(ablob).hexdigest())
        atomic_write(tmp / OPEN_CLIP_CONFIG, json_text({"model_cfg": cfg,
                                                        "preprocess_cfg": preprocess_for(cfg).open_clip_cfg()},
                                                       indent=2, sort_keys=True))
        atomic_write(tmp / MANIFEST, json_text(manifest, indent=2, sort_keys=True))
    return Path(dest)


def default_encoder(shipped_dir: str | Path = SHIPPED_DIR) -> Path:
    """The shipped encoder as a checkpoint folder under the data folder (expanded on first use)."""
    d = Path(shipped_dir)
    if not (d / SHIPPED_MANIFEST).is_file():
        raise EncoderLoadError(f"{d}: no shipped encoder in this install (train one: python cli.py train-encoder)")
    sha = json.loads((d / SHIPPED_MANIFEST).read_text())["sha256"]
    dest = paths.data_dir() / "encoders" / f"shipped-{sha[:12]}"
    if not (dest / MANIFEST).is_file():
        expand(d, dest)
    return dest
