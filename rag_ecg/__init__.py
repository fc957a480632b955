"""rag-ecg: interpret ECG images by retrieving similar past cases and reasoning from them.

Packages, in the order a picture flows through them (each `__init__` maps its modules):
- `data`     records, the case store, picture loading, the diagnostic vocabulary
- `paper`    paper-ECG rendering + artifacts, and the digitiser that reads a page back into traces
- `encoder`  the CLIP-style dual encoder (open_clip) and its checkpoints
- `search`   FAISS indexes and retrieval of the nearest cases (evidence, calibration)
- `reader`   readers (retrieval, hf, vllm), prompts, the report schema and its renderings
- `review`   batch chart review (resumable SQL jobs, local and Ray engines, CSV/JSONL/HTML)
- `eval`     metrics, encoder evaluation, whole-pipeline evaluation
Shared plumbing: `errors` (one RagEcgError root), `io` (atomic writes, JSON, versions), `config` (YAML +
overrides -> dataclass), `paths` (default locations), `redact` (secrets masked in
written settings, URLs and messages). Importing the package pulls in no GPU or model code.
"""
__version__ = "0.1.0"
