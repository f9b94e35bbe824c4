"""Passthrough columns through the real CLI: a column named like a record field is kept renamed with a warning,
a column mixing types reads back with json.loads, a failed row keeps its cells, and editing only a passthrough
value updates the record without rendering again."""

from __future__ import annotations

import json
import logging
import time
import uuid

import pandas as pd
import pyarrow.parquet as pq
from util import output_names, read_records

from ipaflow.flows.cli import main
from ipaflow.tasks.metadata_schema import is_json_text

TEXT2IMG = {"spec": "sdxl-text2img", "prompt": "p", "num_inference_steps": 1, "width": 64, "height": 64}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _rows(inputs_dir):
    image = str(inputs_dir / "bear.png")
    return [
        {**TEXT2IMG, "id": "a", "ip_image": image, "status": "draft", "note": "first", "mixed": 1, "meta": {"k": [1, 2]}},
        {**TEXT2IMG, "id": "b", "ip_image": image, "status": "final", "note": "second", "mixed": "one", "meta": None},
        {**TEXT2IMG, "id": "bad", "ip_image": image, "num_inference_steps": 0, "status": "s", "note": "kept on failure",
         "mixed": [1, "x"]},
        {**TEXT2IMG, "id": "gone", "ip_image": str(inputs_dir / "no-such.png"), "note": "kept too", "mixed": 2.5},
    ]


def _run_warnings(stem: str, expected: str) -> list[str]:
    """The WARNING lines of the flow run of a manifest named ``stem``, as the Prefect API recorded them (polled
    until ``expected`` is among them, for up to 10 s: the API records logs asynchronously)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=stem)))[0]
        for _ in range(50):
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            warnings = [log.message for log in logs if log.level == logging.WARNING]
            if expected in warnings:
                break
            time.sleep(0.2)
    return warnings


def _mtimes(out):
    return {name: (out / "images" / name).stat().st_mtime_ns for name in output_names(out / "images")}


def test_passthrough_columns_are_kept_renamed_typed_on_failure_and_updated_without_rendering(
        tmp_path, models_env, prefect_api, inputs_dir, capsys):
    rows = _rows(inputs_dir)
    manifest = _write_jsonl(tmp_path / f"passthrough-{uuid.uuid4().hex[:8]}.jsonl", rows)  # names the flow run
    out = tmp_path / "out"

    assert main(["validate", str(manifest)]) == 1  # two bad rows
    err = capsys.readouterr().err
    assert "warning: column status is a metadata record field: its values are kept as manifest_status" in err

    assert main(["render", str(manifest), "--out", str(out)]) == 1
    renamed = "manifest: column status is a metadata record field: its values are kept as manifest_status"
    assert _run_warnings(manifest.stem, renamed).count(renamed) == 1
    assert "2 rendered, 0 already done, 2 failed" in capsys.readouterr().out
    records = read_records(out).set_index("id")
    assert records.loc["a", "status"] == "ok" and records.loc["a", "manifest_status"] == "draft"
    assert records.loc["bad", "status"] == "failed" and records.loc["bad", "manifest_status"] == "s"
    assert (records.loc["bad", "note"], records.loc["gone", "note"]) == ("kept on failure", "kept too")
    assert is_json_text(pq.read_schema(out / "metadata" / "00-schema.parquet").field("mixed"))
    assert {i: json.loads(records.loc[i, "mixed"]) for i in records.index} == \
        {"a": 1, "b": "one", "bad": [1, "x"], "gone": 2.5}
    assert json.loads(records.loc["a", "meta"]) == {"k": [1, 2]} and pd.isna(records.loc["b", "meta"])
    rendered = _mtimes(out)
    keys = records["key"].to_dict()

    rows[0]["note"] = "edited"
    rows[1]["status"] = "approved"
    rows[1]["mixed"] = {"now": "a mapping"}
    _write_jsonl(manifest, rows)
    assert main(["render", str(manifest), "--out", str(out)]) == 1
    assert "0 rendered, 2 already done (2 records updated), 2 failed" in capsys.readouterr().out
    assert _mtimes(out) == rendered  # nothing rendered or written again
    again = read_records(out).set_index("id")
    assert len(again) == 4
    assert (again.loc["a", "note"], again.loc["b", "manifest_status"]) == ("edited", "approved")
    assert json.loads(again.loc["b", "mixed"]) == {"now": "a mapping"} and json.loads(again.loc["a", "mixed"]) == 1
    for row_id in ("a", "b"):
        assert again.loc[row_id, "status"] == "ok" and again.loc[row_id, "key"] == keys[row_id]
        assert list(again.loc[row_id, "outputs"]) == list(records.loc[row_id, "outputs"])

    assert main(["render", str(manifest), "--out", str(out)]) == 1  # values as recorded: nothing to update
    assert "0 rendered, 2 already done, 2 failed" in capsys.readouterr().out
    assert main(["records", str(out)]) == 0  # JSON Lines: mixed columns as the values they encode
    exported = {row["id"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert (exported["b"]["mixed"], exported["bad"]["mixed"], exported["a"]["meta"]) == ({"now": "a mapping"}, [1, "x"],
                                                                                        {"k": [1, 2]})


def test_a_renamed_column_meeting_a_column_of_its_new_name_is_refused_in_one_line(tmp_path, inputs_dir, capsys):
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{**TEXT2IMG, "id": "a", "ip_image": str(inputs_dir / "bear.png"),
                                                    "status": "x", "manifest_status": "y"}])
    for command in (["validate", str(manifest)], ["render", str(manifest), "--out", str(tmp_path / "out")]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "manifest has a column manifest_status too" in err[0]
    assert not (tmp_path / "out").exists()
