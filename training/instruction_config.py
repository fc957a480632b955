"""How an instruction set is built (task families, evidence share, renders, splits): one config, loaded from
YAML + overrides and saved in the set's manifest."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rag_ecg.config import load_config
from rag_ecg.errors import ConfigError

FAMILIES = ("classification", "rhythm", "morphology", "report")
AMPLITUDE_CODES = ("LVOLT", "HVOLT", "VCLVH")


@dataclass
class InstructionConfig:
    """How the instruction set is built; saved in the manifest."""

    db_url: str | None = None  # case store URL; None = the default store (RAG_ECG_DB or data/rag_ecg.db)
    out_dir: str = "data/instructions"  # where train.jsonl, val.jsonl, images/ and manifest.json go
    sources: list[str] = field(default_factory=lambda: ["ptbxl"])  # case sources used
    train_folds: list[int] = field(default_factory=lambda: list(range(1, 9)))  # PTB-XL folds for training
    val_folds: list[int] = field(default_factory=lambda: [9])  # PTB-XL folds for validation
    limit: int | None = None  # at most this many cases (lowest ids first); None = all
    seed: int = 0  # question choice, phrasing, render preset/seed, evidence share
    samples_per_family: dict[str, int] = field(
        default_factory=lambda: {f: 1 for f in FAMILIES})  # samples per case and task family
    original_report_share: float = 0.25  # share of report samples asking for the original report text
    evidence_share: float = 0.3  # share of samples whose prompt carries the retrieved-case evidence
    evidence_k: int = 5  # neighbours shown in an evidence block
    index_dir: str | None = None  # built index (index/build.py) used to retrieve evidence
    encoder_dir: str | None = None  # or: trained encoder; nearest train pages by cosine similarity
    vote_temperature: float = 0.05  # softmax temperature of the neighbours' label votes (encoder retrieval)
    render_presets: list[str] = field(
        default_factory=lambda: ["clean", "print", "scan", "photo", "random"])  # one picked per case
    dpi: int = 100  # page resolution; 100 dpi A4 = 1169 x 827 px (PULSE-7B tiles at 336 px)
    mc_options: int = 4  # options of a multiple-choice question (fewer when too few distractors exist)
    min_likelihood: float = 50.0  # diagnostic statements coded below this are uncertain: not asked
    exclude_codes: list[str] = field(default_factory=lambda: list(AMPLITUDE_CODES))  # never asked about
    workers: int = 1  # processes rendering pages (rendering is the slow part)

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides) -> InstructionConfig:
        """YAML (optional) + keyword overrides (None = keep); unknown fields are an error."""
        cfg = load_config(cls, path, overrides, what="instruction config")
        bad = sorted(set(cfg.samples_per_family) - set(FAMILIES))
        if bad:
            raise ConfigError(f"samples_per_family: unknown task family {', '.join(bad)} "
                              f"(one of {', '.join(FAMILIES)})")
        if not 0.0 <= cfg.evidence_share <= 1.0:
            raise ConfigError(f"evidence_share: {cfg.evidence_share} is outside 0-1")
        if cfg.mc_options < 2:
            raise ConfigError(f"mc_options: {cfg.mc_options} must be >= 2")
        return cfg

