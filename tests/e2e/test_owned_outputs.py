"""Outputs owned across runs, from the command line: a run may not overwrite what an earlier run wrote into the
same --out under another id (ids compared without case). The row fails alone naming the owner; the owner's
image and record stay as they were, and a re-run of the first manifest finds everything done."""

from __future__ import annotations

from util import output_names, read_records, write_manifest

from ipaflow.flows.cli import main


def test_a_later_run_cannot_take_an_earlier_runs_output(tmp_path, inputs_dir, models_env, prefect_api, capsys):
    row = {"spec": "sdxl-text2img", "prompt": "two of them", "num_inference_steps": 1, "width": 64, "height": 64,
           "ip_image": str(inputs_dir / "bear.png")}
    first = write_manifest(tmp_path / "first.parquet", [{**row, "id": "a", "num_images": 2}])
    out = tmp_path / "out"
    assert main(["render", str(first), "--out", str(out)]) == 0
    written = {name: (out / "images" / name).read_bytes() for name in ("a-0.png", "a-1.png")}

    second = write_manifest(tmp_path / "second.parquet", [{**row, "id": "a-0", "prompt": "another"},
                                                          {**row, "id": "A-1", "prompt": "in capitals"}])
    assert main(["render", str(second), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    records = read_records(out).set_index("id")
    for row_id, stem in (("a-0", "a-0"), ("A-1", "A-1")):
        reason = f"id: its output {stem} (png) belongs to row a of an earlier run; rename this row"
        assert records.loc[row_id, "status"] == "failed" and records.loc[row_id, "error"] == reason
        assert reason in printed
    assert {name: (out / "images" / name).read_bytes() for name in written} == written
    assert output_names(out / "images") == ["a-0.png", "a-1.png"]
    assert records.loc["a", "status"] == "ok" and len(records.loc["a", "outputs"]) == 2

    assert main(["render", str(first), "--out", str(out)]) == 0
    assert "1 rows: 0 rendered, 1 already done" in capsys.readouterr().out
    assert {name: (out / "images" / name).read_bytes() for name in written} == written
