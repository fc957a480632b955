"""The jobs that fill the case store and build indexes, run from the checkout through `cli.py`.

- `ingest`: WFDB records (PTB-XL, LUDB, any folder) -> validated cases in the case store (idempotent).
- `build`: cases -> rendered pages -> embeddings -> FAISS index folder with calibration (resumable).
- `render_job`: records -> paper-ECG PNG/JPEG pages + layout JSON, on all cores.
- `quickstart`: the one-command demo (ingest, train or reuse the encoder, build the index, review, score).
"""
