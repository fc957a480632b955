"""A saved vector index is a pair: the FAISS file and a JSON manifest beside it (`images.faiss` + `images.json`).

The manifest says what the file is (kind, dim, rows, the encoder hash it was built with, config, versions)
and vouches for it (byte size and sha256). The pair is written file, then manifest, each atomically through
`rag_ecg.io`; a crash between the two leaves a new file beside the old manifest, which `read_index_pair`
refuses (size/checksum mismatch) rather than serving vectors the manifest does not describe. That is why an
index *folder* is never saved in place: `index/build.py` writes a whole build in a staging folder and swaps
it in with one rename, so the pairs a reader opens are always whole.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import faiss

from rag_ecg.errors import ArtifactError
from rag_ecg.io import json_text, publish, temp_path
from rag_ecg.search.index_config import VectorIndexError

FORMAT = "rag-ecg-faiss"
STRUCTURES = {"flat": faiss.IndexFlat, "ivfpq": faiss.IndexRefine, "hnsw": faiss.IndexHNSW}  # kind -> inner type


class IndexLoadError(VectorIndexError, ArtifactError):
    """A saved index is missing, corrupt, or does not match its manifest."""


class IndexMismatchError(VectorIndexError, ArtifactError):
    """A saved index was built by another encoder than the one that will query it."""


def manifest_path(path: str | Path) -> Path:
    """The manifest JSON that sits beside an index file: `images.faiss` -> `images.json`."""
    path = Path(path)
    if path.suffix == ".json":
        raise VectorIndexError(f"{path}: an index file cannot end in .json (that name is its manifest's)")
    return path.with_suffix(".json")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a saved index, or IndexLoadError naming what is wrong."""
    mpath = manifest_path(path)
    try:
        m = json.loads(mpath.read_text())
    except FileNotFoundError as e:
        raise IndexLoadError(f"{mpath}: manifest missing (every saved index has one beside it)") from e
    except (OSError, ValueError) as e:
        raise IndexLoadError(f"{mpath}: manifest unreadable ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise IndexLoadError(f"{mpath}: not a rag-ecg index manifest")
    return m


def serialized_size(index: Any) -> int:
    """Bytes `faiss.write_index(index, …)` writes, counted without a copy."""
    counter = _ByteCounter()
    faiss.write_index(index, faiss.PyCallbackIOWriter(counter))
    return counter.n


def write_index_pair(path: str | Path, index: Any, manifest: dict[str, Any]) -> Path:
    """Write the FAISS `index` to `path` and `manifest` (+ the file's size and sha256) beside it, atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VectorIndexError(f"{path}: cannot create its folder ({e})") from e
    mpath = manifest_path(path)
    tmp_index = tmp_manifest = None
    try:
        tmp_index = temp_path(path)
        faiss.write_index(index, str(tmp_index))
        manifest = {**manifest, "file_bytes": tmp_index.stat().st_size, "file_sha256": _sha256(tmp_index)}
        tmp_manifest = temp_path(mpath)
        tmp_manifest.write_text(json_text(manifest, indent=2))
        publish(tmp_index, path)
        tmp_index = None
        publish(tmp_manifest, mpath)
        tmp_manifest = None
    except (OSError, RuntimeError) as e:
        raise VectorIndexError(f"{path}: cannot save index ({e})") from e
    finally:
        for t in (tmp_index, tmp_manifest):
            if t is not None:
                t.unlink(missing_ok=True)
    return path


def read_index_pair(path: str | Path, expected_encoder_hash: str | None = None,
                    verify: bool = True) -> tuple[Any, dict[str, Any]]:
    """(id-mapped FAISS index, manifest) of a saved pair, each check naming what does not match.

    IndexMismatchError when the index was built by another encoder than `expected_encoder_hash`;
    IndexLoadError for a missing, truncated, corrupt or mislabelled file. `verify=False` skips the sha256.
    """
    path = Path(path)
    if not path.is_file():
        raise IndexLoadError(f"{path}: index file missing")
    m = read_manifest(path)
    if expected_encoder_hash is not None and m.get("encoder_hash", "") != expected_encoder_hash:
        raise IndexMismatchError(
            f"{path}: index was built with encoder {m.get('encoder_hash') or '<none>'} but the query encoder is "
            f"{expected_encoder_hash or '<none>'}; rebuild the index with this encoder")
    size = path.stat().st_size
    if m.get("file_bytes") is not None and size != m["file_bytes"]:
        raise IndexLoadError(f"{path}: {size} bytes but its manifest says {m['file_bytes']} (interrupted save or "
                             f"a file copied without its manifest)")
    if verify and m.get("file_sha256") and _sha256(path) != m["file_sha256"]:
        raise IndexLoadError(f"{path}: content does not match its manifest checksum (corrupt or replaced)")
    try:
        index = faiss.read_index(str(path))  # already downcast; this wrapper owns the C++ object
    except RuntimeError as e:
        raise IndexLoadError(f"{path}: not a readable FAISS index ({str(e).splitlines()[0][:200]})") from e
    expected = STRUCTURES.get(m.get("kind"))
    if (expected is None or not isinstance(index, faiss.IndexIDMap2) or index.d != m.get("dim")
            or not isinstance(faiss.downcast_index(index.index), expected)):
        raise IndexLoadError(f"{path}: FAISS index does not match its manifest (expected an id-mapped "
                             f"{m.get('dim')}-d {m.get('kind')} index)")
    return index, m


class _ByteCounter:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, b: bytes) -> int:
        self.n += len(b)
        return len(b)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
