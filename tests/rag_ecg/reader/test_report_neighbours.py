"""The retrieval report shows each retrieved case's findings in English (PTB-XL's scp_statements.csv) beside its
own report, quoted with its mangled umlauts repaired, and its similarity share among best matches when known."""
from __future__ import annotations

import re
from dataclasses import replace

from rag_ecg.reader.backends import get_backend
from rag_ecg.reader.interpret import interpret
from rag_ecg.reader.report_render import render_html, render_report
from rag_ecg.data.text_repair import repair_report
from tests.openai_server import ptbxl_evidence


def test_text_and_html_list_english_findings_and_the_quoted_report(ptbxl_dir):
    ev = ptbxl_evidence(ptbxl_dir)
    ev.neighbours[0] = replace(ev.neighbours[0], similarity_pct=97.4,
                               report=ev.neighbours[0].report + " <script>alert(1)</script>")
    report = interpret(None, ev, get_backend("retrieval"))
    text = render_report(report, "text", neighbours=ev.neighbours)
    page = render_html(report, neighbours=ev.neighbours)
    assert "similarity 0.930 · closer than 97 % of best matches" in text
    assert "0.930 · closer than 97 % of best matches" in page
    mangled = [n for n in ev.neighbours if re.search(r"[a-z][ÄÖÜÅ]", n.report)]
    assert mangled  # the real reports carry PTB-XL's mangled umlauts (the Swedish one: "fÖrÄndring")
    for n in ev.neighbours:
        assert n.code_descriptions  # filled from scp_statements.csv
        for code, desc in n.code_descriptions.items():
            assert re.search(rf"{re.escape(desc)} \({re.escape(code)}[ )]", text), (code, desc)
            assert f"<li>{desc} ({code}" in page
        fixed = repair_report(n.report)
        assert f'report (original): "{fixed}"' in text
        assert not re.search(r"[a-z][ÄÖÜÅ]", fixed)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page
    # without the neighbours (an old caller) the report renders as before
    assert "findings:" not in render_report(report, "text") and "Findings (English)" not in render_html(report)
