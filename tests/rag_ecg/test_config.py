"""rag_ecg.config: one loader for every dataclass config (YAML + overrides), one meaning for each override shape."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from rag_ecg.config import from_dict, load_config, parse_overrides, to_yaml
from rag_ecg.errors import ConfigError, InputError, RagEcgError


@dataclass
class Recipe:
    lr: float = 1e-3  # learning rate
    epochs: int = 2  # passes over the data
    run_dir: str | None = "runs/x"  # where checkpoints go
    presets: list[str] = field(default_factory=lambda: ["clean"])  # page presets

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs: {self.epochs} must be >= 1")


def test_yaml_then_overrides_with_coercion(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lr: 1e-4\nepochs: 3\npresets: [scan, photo]\n")  # YAML reads 1e-4 as a string
    cfg = load_config(Recipe, path, ["epochs=5", "run-dir=null"])
    assert cfg == Recipe(lr=1e-4, epochs=5, run_dir=None, presets=["scan", "photo"])
    assert isinstance(cfg.lr, float)
    # a dict of typed CLI options: None means "not given" and keeps the file's value
    assert load_config(Recipe, path, {"epochs": None, "run_dir": None}).run_dir == "runs/x"
    assert load_config(Recipe, path, {"lr": 1}).lr == 1.0  # an int where a float is declared
    assert load_config(Recipe) == Recipe()


def test_saved_config_reads_back(tmp_path):
    cfg = Recipe(lr=0.5, epochs=4, run_dir=None, presets=["photo"])
    (tmp_path / "saved.yaml").write_text(to_yaml(cfg))
    assert load_config(Recipe, tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("text, overrides, message", [
    (None, ["nonsense"], "expected key=value"),
    ("lr: 1\n", ["epoch=3"], r"r\.yaml: unknown Recipe field\(s\) epoch"),
    ("lr: fast\n", [], "lr: 'fast' is not a valid float"),
    ("- a list\n", [], "expected a mapping"),
    ("lr: [unclosed\n", [], "cannot read config"),
    ("epochs: 0\n", [], "epochs: 0 must be >= 1"),
])
def test_bad_configs_are_config_errors_naming_the_file(tmp_path, text, overrides, message):
    path = tmp_path / "r.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(Recipe, path if text is not None else None, overrides)


def test_missing_file_and_the_error_family(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found") as info:
        load_config(Recipe, tmp_path / "nope.yaml")
    assert isinstance(info.value, InputError) and isinstance(info.value, ValueError)
    assert isinstance(info.value, RagEcgError) and info.value.exit_code == 2
    assert parse_overrides(["a=1", "b=[1, 2]", "c=null"]) == {"a": 1, "b": [1, 2], "c": None}
    with pytest.raises(ConfigError, match="unknown Recipe field"):
        from_dict(Recipe, {"nope": 1}, "test")
