"""The jobs that fill the case store and build indexes, run from the checkout through `cli.py`.

- `ingest`: WFDB records (PTB-XL, LUDB, any folder) -> validated cases in the case store (idempotent).
- `build`: cases -> rendered pages -> embeddings -> FAISS index folder with calibration (resumable).
- `render_job`: records -> paper-ECG PNG/JPEG pages + layout JSON, on all cores.
- `site_calibration`: a hospital's labelled charts -> the index's probabilities and thresholds refitted to them.
- `quickstart`: the one-command demo (ingest, train or reuse the encoder, build the index, review, score).
"""
