"""The training commands end to end through `cli.py` on tiny real inputs: `build-instructions` from the small
store and its index, `finetune` of the tiny LLaVA on exactly that output, `convert-pulse` of the tiny model
written in the LLaVA-repo layout; each also with one bad input (one `error:` line, exit code 2)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app
from tests.openai_server import tiny_llava_dir
from tests.training.test_convert_pulse import write_llava_checkpoint

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
LIMIT = 16  # the 16 lowest case ids: 13 PTB-XL training cases (folds 1-8) and 3 fold-9 ones


def _one_error_line(res, *words: str) -> None:
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert all(w in lines[0] for w in words), res.output


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def instructions(tiny_index, tmp_path_factory):
    """`cli.py build-instructions` on the small store with the tiny index's evidence (small clean pages)."""
    root = tmp_path_factory.mktemp("instructions")
    (root / "small.yaml").write_text("dpi: 40\nrender_presets: [clean]\n")
    out = root / "set"
    res = runner.invoke(app, ["build-instructions", "--config", str(root / "small.yaml"), "--db", tiny_index["db"],
                              "--out", str(out), "--index", str(tiny_index["index"]), "--limit", str(LIMIT),
                              "--seed", "3", "--evidence-share", "0.5"])
    return res, out


def test_build_instructions_writes_the_set_and_its_manifest(instructions, tiny_index):
    res, out = instructions
    assert res.exit_code == 0, res.output
    assert f"manifest: {out / 'manifest.json'}" in res.output.replace("\n", "")
    manifest = json.loads((out / "manifest.json").read_text())
    cfg = manifest["config"]
    assert (cfg["dpi"], cfg["render_presets"]) == (40, ["clean"])  # from the --config file
    assert (cfg["limit"], cfg["seed"], cfg["evidence_share"]) == (LIMIT, 3, 0.5)  # from the options
    assert cfg["index_dir"] == str(tiny_index["index"]) and manifest["retriever"].startswith("index:")
    rows = {sp: _jsonl(out / f"{sp}.jsonl") for sp in ("train", "val")}
    cases = {sp: {r["case_id"] for r in rows[sp]} for sp in rows}
    assert (len(cases["train"]), len(cases["val"])) == (13, 3) and not manifest["skipped_cases"]
    for sp, split_rows in rows.items():
        counts = manifest["counts"][sp]
        assert counts["samples"] == len(split_rows) == manifest["files"][f"{sp}.jsonl"]["samples"]
        assert counts["with_evidence"] == sum(bool(r["evidence_case_ids"]) for r in split_rows) > 0
        assert all(r["case_id"] not in r["evidence_case_ids"] for r in split_rows)  # never its own case
    pages = {r["image"] for sp in rows for r in rows[sp]}
    assert len(pages) == manifest["images"] == LIMIT
    for page in pages:
        with Image.open(out / page) as im:
            assert im.format == "PNG" and 400 < im.width < 520  # an A4 page at 40 dpi (100 dpi: 1169 px)

    bad = runner.invoke(app, ["build-instructions", "--db", tiny_index["db"], "--out", str(out.parent / "bad"),
                              "--evidence-share", "1.5"])
    _one_error_line(bad, "evidence_share: 1.5 is outside 0-1")
    assert not (out.parent / "bad").exists()


def test_finetune_trains_on_the_built_instructions(instructions, tmp_path):
    res, data = instructions
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    args = ["finetune", "--config", str(REPO / "training" / "configs" / "lora_tiny_cpu.yaml"),
            "--model-path", str(tiny_llava_dir())]
    sets = [f"train_jsonl={data / 'train.jsonl'}", f"val_jsonl={data / 'val.jsonl'}", f"out_dir={run}",
            "max_steps=2", "save_every=1", "save_total_limit=1", "eval_every=0", "eval_max_samples=2", "merge=false"]
    res = runner.invoke(app, [*args, *[x for s in sets for x in ("--set", s)]])
    assert res.exit_code == 0, res.output
    assert f"run: {run}" in res.output.replace("\n", "")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["steps"] == manifest["total_steps"] == 2 and not manifest["skipped_samples"]
    assert manifest["train_samples"] == len(_jsonl(data / "train.jsonl"))
    assert manifest["val_samples"] == len(_jsonl(data / "val.jsonl"))
    assert manifest["config"]["model_path"] == str(tiny_llava_dir())  # --model-path
    metrics = _jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2]
    assert all(r["loss"] > 0 and r["answer_tokens"] > 0 for r in metrics if "loss" in r)
    assert [r["step"] for r in metrics if r.get("val_loss", 0) > 0] == [2]  # the final evaluation
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in adapter) and any("multi_modal_projector" in k for k in adapter)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]  # step 1 pruned
    assert not (run / "merged").exists()  # merge=false

    bad = runner.invoke(app, [*args, "--set", "lora_rank=8"])
    _one_error_line(bad, "unknown FinetuneConfig field(s) lora_rank")


def test_convert_pulse_writes_a_loadable_hf_model(tmp_path):
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    folder = tiny_llava_dir()
    model = LlavaNextForConditionalGeneration.from_pretrained(folder).eval()
    processor = LlavaNextProcessor.from_pretrained(folder)
    src, out = tmp_path / "PULSE-tiny", tmp_path / "pulse-tiny-hf"
    write_llava_checkpoint((folder, model, processor), src, True, "safetensors")
    res = runner.invoke(app, ["convert-pulse", str(src), str(out), "--max-shard-gb", "0.0001", "--verify"])
    assert res.exit_code == 0, res.output
    assert f"converted: {out}" in res.output.replace("\n", "")
    manifest = json.loads((out / "conversion_manifest.json").read_text())
    assert manifest["source_model_type"] == "llava_llama"
    assert manifest["image_token_index"] == model.config.image_token_index
    assert (manifest["config"]["verify"], manifest["config"]["max_shard_gb"]) == (True, 0.0001)
    shards = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    converted = LlavaNextForConditionalGeneration.from_pretrained(out).eval()
    ids = processor.tokenizer("USER: sinus rhythm? ASSISTANT:", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(converted(input_ids=ids).logits, model(input_ids=ids).logits)

    bad = runner.invoke(app, ["convert-pulse", str(src), str(tmp_path / "other"), "--dtype", "int4"])
    _one_error_line(bad, "argument --dtype: invalid choice: 'int4'", "cli.py convert-pulse --help")
    assert not (tmp_path / "other").exists()
    helped = runner.invoke(app, ["convert-pulse", "--help"])  # the converter's own arguments, not an empty list
    assert helped.exit_code == 0 and "--vision-tower" in helped.output and "--dtype" in helped.output
