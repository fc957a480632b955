"""report -> review -> eval through the CLI with `--backend vllm`, against a fake vLLM on 127.0.0.1 that
enforces PULSE-7B's 4,096-token window (tests/fake_vllm.py), on the real tiny index and store of
tests/conftest.py. The reader flags (`--backend-config`, `--max-tokens`, `--no-cot`, `--max-cases`) reach
every command; every request the server receives fits its window, and each report says what was cut.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("openai")
from typer.testing import CliRunner  # noqa: E402

from cli import app  # noqa: E402
from rag_ecg.data.records import read_wfdb  # noqa: E402
from rag_ecg.paper.render import render_page  # noqa: E402
from tests.fake_vllm import FakeVLLM  # noqa: E402

runner = CliRunner()
WINDOW = 4096


def _fits(srv: FakeVLLM) -> bool:
    return all(p + q["max_tokens"] <= WINDOW for p, q in zip(srv.prompts, srv.requests))


def test_report_review_eval_with_the_vllm_backend(tmp_path, ptbxl_dir, tiny_index, scratch_store):
    charts = tmp_path / "charts"
    charts.mkdir()
    for rec in ("04240_lr", "04319_lr"):
        render_page(read_wfdb(ptbxl_dir / "records100" / rec), preset="clean", seed=0, dpi=100).save(
            charts / f"{rec}.png")
    common = ["--index", str(tiny_index["index"]), "--db", scratch_store.url]
    with FakeVLLM(max_model_len=WINDOW) as srv:
        yaml = tmp_path / "reader.yaml"
        yaml.write_text(f"backend: vllm\noptions:\n  base_url: {srv.url}\n  timeout_s: 20\n  max_retries: 0\n")
        reader = ["--backend-config", str(yaml)]

        # report: all defaults (step-by-step, k=8, 1,024 answer tokens) would be a 400; fitted, it is read
        res = runner.invoke(app, ["report", str(charts / "04240_lr.png"), *common, *reader, "--format", "json"])
        assert res.exit_code == 0, res.output
        rep = json.loads(res.stdout)
        assert rep["backend"] == "vllm" and rep["parsed"] and len(rep["retrieval"]["cases"]) == 8
        assert rep["notes"] and "evidence cut to" in rep["notes"][0] and _fits(srv)
        assert "reasoning" in srv.requests[-1]["response_format"]["json_schema"]["schema"]["properties"]

        # review: --no-cot --max-cases 3 --max-tokens 500 reach the requests
        n = len(srv.requests)
        res = runner.invoke(app, ["review", str(charts), "--out", str(tmp_path / "rv"), *common, *reader,
                                  "--no-cot", "--max-cases", "3", "--max-tokens", "500", "--workers", "1"])
        assert res.exit_code == 0, res.output
        assert "2 charts: 2 done, 0 unparsed, 0 error, 0 pending" in res.output
        sent = srv.requests[n:]
        assert len(sent) == 2 and all(q["max_tokens"] == 500 for q in sent) and _fits(srv)
        for q in sent:
            schema = q["response_format"]["json_schema"]["schema"]
            assert "reasoning" not in schema["properties"]
            assert len(schema["$defs"]["StatementAnswer"]["properties"]["cited"]["items"]["enum"]) == 3
        rows = [json.loads(x) for x in (tmp_path / "rv" / "results.jsonl").read_text().splitlines()]
        assert all(r["status"] == "done" and len(r["cited_cases"]) >= 1 for r in rows)

        # eval: two PTB-XL records of the val fold, one preset, the same reader file
        n = len(srv.requests)
        res = runner.invoke(app, ["eval", "--data", str(ptbxl_dir), "--split", "val", "--limit", "2",
                                  "--presets", "clean", "--out", str(tmp_path / "ev"), *common, *reader,
                                  "--max-cases", "2", "--workers", "1"])
        assert res.exit_code == 0, res.output
        ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
        m = ev["presets"]["clean"]
        assert (m["charts"], m["errors"], m["unparsed"], m["pending"]) == (2, 0, 0, 0)
        assert ev["config"]["backend"] == "vllm" and ev["config"]["backend_options"]["max_cases"] == 2
        assert len(srv.requests) == n + 2 and _fits(srv)
        assert m["citations_valid"] == 1.0  # the schema only lets the model cite the cases it was shown
