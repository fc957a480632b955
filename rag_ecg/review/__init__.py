"""Batch chart review: thousands of charts -> one durable, resumable job in the store -> CSV/JSONL/HTML outputs.

Modules, in the order a run uses them:
- `run`        — `review()`, the entry point: resolves the index, opens the job, runs an engine, writes outputs.
- `config`     — `ReviewConfig` (settings; which of them make the job key), `ReviewError`, shared constants.
- `inputs`     — `discover()`: a folder, a CSV list or `store:source=..,fold=..` -> charts with stable keys.
- `jobs`       — the job in SQL: job key, items, attempts, pending batches, one-transaction commits.
- `loader`     — open/draw each chart, letterbox it, make its thumbnail, in worker processes.
- `pipeline`   — `ChartPipeline`: embed -> search -> not-an-ECG check -> report, shared by both engines.
- `local`      — the local engine loop and the progress bar.
- `ray_engine` — the same stages on Ray Data (imported only for `engine="ray"`).
- `outputs`    — results.csv / results.jsonl / manifest.json / thumbnails, regenerated from the store.
- `html`       — the self-contained review page (index.html).
"""
