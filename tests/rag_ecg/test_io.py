"""rag_ecg.io: the one atomic write — readers see the old file or the new one, never half; failures leave no
litter; finished files carry the umask's permissions."""
from __future__ import annotations

import json
import os
import stat

import pytest

from rag_ecg.io import (append_jsonl, atomic_dir, atomic_open, atomic_write, atomic_write_with, read_json, recover_dir,
                        replace_dir, versions, version_mismatches, write_json)


def _litter(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_replaces_text_and_bytes_with_umask_permissions(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write(target, "first\n")
    atomic_write(target, "zweite Zeile: ÄÖÜ\r\n")
    assert target.read_bytes() == "zweite Zeile: ÄÖÜ\r\n".encode()  # text is written byte for byte
    atomic_write(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert _litter(target.parent) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "results.csv"
    atomic_write(target, "old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_open(target) as f:
            f.write("half a fi")
            raise RuntimeError("disk on fire")
    with pytest.raises(OSError):
        atomic_write_with(target, lambda tmp: (tmp.write_text("partial"), open(tmp / "x", "w")))
    assert target.read_text() == "old" and _litter(tmp_path) == []


def test_json_helpers_round_trip_and_append(tmp_path):
    write_json(tmp_path / "m.json", {"path": tmp_path, "n": 1})
    assert read_json(tmp_path / "m.json") == {"path": str(tmp_path), "n": 1}
    for i in range(3):
        append_jsonl(tmp_path / "log.jsonl", {"step": i})
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_atomic_dir_swaps_a_whole_folder_or_nothing(tmp_path):
    final = tmp_path / "adapter"
    with atomic_dir(final) as d:
        (d / "weights").write_text("v1")
    with pytest.raises(ValueError):
        with atomic_dir(final) as d:
            (d / "weights").write_text("v2-half")
            raise ValueError("crash mid-save")
    assert (final / "weights").read_text() == "v1" and _litter(tmp_path) == []
    with atomic_dir(final) as d:
        (d / "weights").write_text("v2")
    assert sorted(p.name for p in final.iterdir()) == ["weights"] and (final / "weights").read_text() == "v2"
    assert _litter(tmp_path) == []


def test_replace_dir_swaps_in_one_step_and_hands_back_the_old_folder(tmp_path):
    final, new = tmp_path / "index", tmp_path / ".index.build"
    final.mkdir()
    (final / "manifest.json").write_text("old")
    new.mkdir()
    (new / "manifest.json").write_text("new")
    old = replace_dir(new, final)
    assert (final / "manifest.json").read_text() == "new"
    assert old is not None and (old / "manifest.json").read_text() == "old"  # Linux: swapped into `new`'s place
    assert replace_dir(old, tmp_path / "fresh") is None and (tmp_path / "fresh" / "manifest.json").exists()


def test_versions_stamp_and_mismatches_ignore_local_build_labels():
    v = versions()
    assert {"rag_ecg", "python", "torch", "numpy", "faiss"} <= set(v)
    assert version_mismatches({**v, "torch": v["torch"].split("+")[0] + "+cu130"}) == []
    assert version_mismatches({"numpy": "0.0.1", "not-installed": "1"}) == [f"numpy 0.0.1 -> {v['numpy']}"]


def test_recover_dir_finishes_a_swap_killed_between_its_renames(tmp_path):
    final = tmp_path / "last"
    (tmp_path / ".last.old.4242").mkdir()  # what replace_dir's fallback leaves when killed after its first rename
    (tmp_path / ".last.old.4242" / "weights").write_text("epoch 1")
    assert recover_dir(final) and (final / "weights").read_text() == "epoch 1" and _litter(tmp_path) == []
    assert not recover_dir(final)  # nothing to do once `final` is there
