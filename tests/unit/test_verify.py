"""``ipaflow verify``: a consistent folder passes (exit 0); a missing output, an orphan and an unreadable part are
each one line (exit 1); ``--deep`` finds an output that does not decode; ``--repair`` fixes them all."""

from __future__ import annotations

import pandas as pd
import pytest
from util import write_folder

from ipaflow.flows.cli import main


def _verify(capsys, *args):
    capsys.readouterr()
    code = main(["verify", *map(str, args)])
    return code, capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("layout", ["files", "webdataset"])
def test_a_consistent_folder_passes(tmp_path, capsys, layout):
    write_folder(tmp_path / "out", layout)
    assert _verify(capsys, tmp_path / "out", "--deep") == (0, [])


def test_problems_are_one_line_each_and_repair_fixes_them(tmp_path, capsys):
    out = tmp_path / "out"
    write_folder(out, "files")
    (out / "images" / "a.png").unlink()
    (out / "images" / "stray.png").write_bytes(b"x")
    (part,) = (out / "metadata").glob("part-*.parquet")
    good = part.read_bytes()
    part.write_bytes(good[:-40])
    code, lines = _verify(capsys, out)
    assert code == 1
    assert lines[0].startswith(f"unreadable: metadata/{part.name} (")
    # the part's records are unreadable: every output is an orphan until --repair rebuilds them
    assert sorted(lines[1:]) == ["orphan: images/b-0.png", "orphan: images/b-1.png", "orphan: images/c.d.png",
                                 "orphan: images/stray.png"]

    part.write_bytes(good)
    assert _verify(capsys, out) == (1, ["missing: images/a.png (record a)", "orphan: images/stray.png"])
    part.write_bytes(good[:-40])
    code, lines = _verify(capsys, out, "--repair")
    assert code == 0 and all(line.startswith("fixed: ") for line in lines), lines
    assert _verify(capsys, out, "--deep") == (0, [])
    records = pd.read_parquet(out / "metadata").set_index("id")
    # b and c.d rebuilt from their outputs; a had no output left, so it stays unrecorded and renders again
    assert sorted(records.index) == ["b", "c.d"] and set(records["status"]) == {"ok"}
    assert sorted(p.name for p in (out / "images").iterdir()) == ["b-0.png", "b-1.png", "c.d.png", "metadata.parquet"]
    assert (out / "README.md").exists()  # the dataset card, rewritten


def test_repair_marks_a_record_missing_its_outputs_failed(tmp_path, capsys):
    out = tmp_path / "out"
    write_folder(out, "files")
    (out / "images" / "b-0.png").unlink()
    code, lines = _verify(capsys, out, "--repair")
    assert code == 0 and lines == ["fixed: missing: images/b-0.png (record b)"]
    records = pd.read_parquet(out / "metadata").set_index("id")
    assert records.loc["b", "status"] == "failed" and list(records.loc["b", "outputs"]) == []
    assert not (out / "images" / "b-1.png").exists()  # what only the superseded record named


def test_deep_finds_an_output_that_does_not_decode(tmp_path, capsys):
    out = tmp_path / "out"
    write_folder(out, "files")
    (out / "images" / "c.d.png").write_bytes((out / "images" / "c.d.png").read_bytes()[:30])
    assert _verify(capsys, out) == (0, [])
    code, lines = _verify(capsys, out, "--deep")
    assert code == 1 and len(lines) == 1 and lines[0].startswith("undecodable: images/c.d.png (record c.d): ")


def test_a_container_no_record_points_into_is_an_orphan_and_repair_removes_it(tmp_path, capsys):
    out = tmp_path / "out"
    write_folder(out, "webdataset")
    (tar,) = (out / "webdataset").glob("*.tar")
    (out / "webdataset" / "stray.tar").write_bytes(tar.read_bytes())
    assert _verify(capsys, out) == (1, ["orphan: webdataset/stray.tar"])
    assert _verify(capsys, out, "--repair") == (0, ["fixed: orphan: webdataset/stray.tar"])
    assert [p.name for p in (out / "webdataset").iterdir()] == [tar.name]
