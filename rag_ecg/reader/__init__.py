"""Readers: evidence (+ the query picture) -> a grounded report that cites the retrieved cases.

- `base`           LLMBackend, the one interface every backend implements
- `backends`       get_backend / backend_from_config: `retrieval` (default), `hf`, `vllm` by name
- `retrieval`      the no-LLM reader: a report composed from the neighbours' votes and reports
- `hf`, `vllm`     LLaVA-NeXT in process (transformers) / on a vLLM server (OpenAI API); imported on demand
- `messages`       chat-message conversions (LangChain / OpenAI dicts, images as parts or data URLs)
- `prompts`        chain-of-thought prompts with the retrieved cases quoted as data
- `parse`          a model's answer -> Report (JSON extraction, field validation, ParseError)
- `report`         the Report schema and the citation check
- `measured`       rule-based findings from the tracing's measurements (urgent STEMI first), their prompt block
- `tracing`        the tracing's measurements for a report (record, store case, or a page's digitiser read)
- `report_render`  a Report as text, JSON or a self-contained HTML page; saving one
- `interpret`      interpret(): prompt -> generate -> parse -> retry -> cite-check; report_command for the CLI
"""
