"""Nearest-case search: FAISS vector indexes over case embeddings, and queries against a built index folder.

- `retrieve`: `Retriever` — open a built index folder, query by page / text / embedding, get `Evidence`.
- `evidence`: `Evidence` and `Neighbour`, what retrieval hands to a reader (no encoder or index needed), and the
  one ranking rule (similarity rounded to 1e-5, then case id: thread-count float noise cannot reorder).
- `calibration`: vote (+ the encoder's superclass head) -> probability, decision thresholds and the similarity
  scale, fitted on held-out ECGs drawn as pictures (the library itself when the store holds no held-out split).
- `lexical`: `LexicalSearch` — words, clinical shorthand and named SCP statements against the store's full-text
  table (BM25 on SQLite FTS5, IDF-weighted ts_rank on PostgreSQL).
- `text_search`: `TextSearch` — a text query: the words' ranking fused with the text tower (RRF) over an index's
  library, or the words alone over the store.
- `vector_index`: `VectorIndex` — cosine k-NN keyed by case id (flat / IVF-PQ / HNSW), add, remove, search.
- `index_config`: `IndexConfig` (how an index is built and searched) and `VectorIndexError`.
- `index_files`: a saved index = FAISS file + JSON manifest, written as an atomic pair and checked on load.
- `index_folder`: `cases.json`, what binds a built index folder to its case store, and the check on open.
- `faiss_gpu`: GPU search replicas (faiss-gpu only; every other path runs on CPU).
"""
