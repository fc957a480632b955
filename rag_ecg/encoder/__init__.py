"""The CLIP-style ECG encoder (open_clip): ECG pages and report text embedded into one space.

- `model`: `ECGEncoder` — create, embed pages / traces / texts, save, load (start here).
- `configs`: the repo's open_clip model configs (`model_configs/*.json`), `build_model`, `resolve_device`.
- `towers`: image towers of our own as `nn.Module`s (`TraceTower`, a 1-D CNN over digitised traces).
- `preprocess`: page -> model input (`Preprocess` letterboxes pixels, `TracePreprocess` digitises traces).
- `text`: `case_text` (what a case's text is) and the offline `Tokenizer`.
- `checkpoint`: checkpoint folders (safetensors + manifest), written atomically, checked on load.
- `shipped`: the encoder the package ships (`weights/`, ~3 MB: kept token rows, float16) and `default_encoder()`.
"""
