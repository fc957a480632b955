"""PTB-XL's case-mangled umlauts are repaired for display, on the real reports (../shared/data/ptbxl)."""
from __future__ import annotations

import csv
import re

from rag_ecg.data.labels import english_statements, read_scp_statements
from rag_ecg.data.text_repair import repair_report


def test_real_reports_lose_every_mangled_umlaut_and_keep_everything_else(ptbxl_dir):
    with open(ptbxl_dir / "ptbxl_database.csv", newline="", encoding="utf-8") as f:
        reports = [r["report"] for r in csv.DictReader(f)]
    mangled = [t for t in reports if re.search(r"[a-zäöüå][ÄÖÜÅ]", t)]
    assert len(mangled) > 100  # the data has them: "unbestÄtigter bericht"
    for text in reports:
        fixed = repair_report(text)
        assert not re.search(r"[a-zäöüå][ÄÖÜÅ]", fixed), fixed  # no capital umlaut inside a lower-case word
        assert fixed.lower() == text.lower() or "Ã" in text  # only letter case changed
        assert len(fixed) == len(text)
    assert repair_report("unbestÄtigter bericht") == "unbestätigter bericht"
    assert repair_report("sinusrhythmus lagetyp normal  unvollstÄndiger rechtsschenkelblock") == \
        "sinusrhythmus lagetyp normal  unvollständiger rechtsschenkelblock"
    # Swedish, a capital at a word's start in lower-cased text: lower-cased too
    assert repair_report("anterior infarkt     Ålder ej bestÄmd") == "anterior infarkt     ålder ej bestämd"
    # a person's typed edit after capitals keeps its capitals
    assert repair_report("Edit: NORM 100, Überdreht") == "Edit: NORM 100, Überdreht"
    assert repair_report("erhöhte ST-Abgänge II-III") == "erhöhte ST-Abgänge II-III"
    # UTF-8 read as Latin-1 (mojibake) is decoded back
    assert repair_report("unbestÃ¤tigter bericht, schweiÃŸ") == "unbestätigter bericht, schweiß"
    assert repair_report(None) == "" and repair_report("ÜBER") == "ÜBER"


def test_statements_in_english_from_scp_statements(ptbxl_dir):
    desc = {k: v.description for k, v in read_scp_statements(ptbxl_dir / "scp_statements.csv").items()}
    out = english_statements({"SR": 0.0, "IMI": 35.0, "NORM": 100.0, "XYZ": 10.0}, desc)
    assert out == [("NORM", "normal ECG", 100.0), ("IMI", "inferior myocardial infarction", 35.0),
                   ("XYZ", "XYZ", 10.0), ("SR", "sinus rhythm", 0.0)]
    assert english_statements({"AFIB": 100.0}, {})[0][1] == "atrial fibrillation"  # a store without the table
