"""One run's figures, read everywhere an operator reads them: the command line's summary, the flow run's state
message, the progress, failed-rows and summary artifacts (from a real Prefect API), the gallery and
``ipaflow records``. The manifest holds rows without a usable id and a duplicate id, which have no record of
their own: counted failed, and named by manifest row. Rendered twice: the re-run skips what is done. Every record
names its manifest file, absolute though the manifest was given relative."""

from __future__ import annotations

import io
import json
import re

from util import artifact_role, markdown_table, write_manifest


def _rows(inputs_dir, folder):
    row = {"spec": "sdxl-text2img", "ip_image": str(inputs_dir / "diner.png"), "num_inference_steps": 1}
    return [{**row, "id": "ok-0", "prompt": "a"},
            {**row, "id": "bad/slash", "prompt": "b"},  # manifest row 1: no usable id
            {**row, "id": "dup", "prompt": "c"},
            {**row, "id": "ok-1", "prompt": "d"},
            {**row, "id": "", "prompt": "e"},  # manifest row 4: no usable id
            {**row, "id": "dup", "prompt": "f"},  # manifest row 5: the second row of a duplicate id
            {**row, "id": "missing", "ip_image": str(folder / "nowhere.png")},
            {**row, "id": "ok-2", "prompt": "g"}]


def _everywhere(state, out, capsys):
    """(rendered, skipped, failed) as each place says them, and the failed rows' names each place lists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from ipaflow.flows.cli import print_summary
    from ipaflow.flows.records import export_records

    summary = state.result()
    print_summary(summary)
    printed = capsys.readouterr().out
    said = {}
    match = re.search(r"^(\d+) rows: (\d+) rendered, (\d+) already done, (\d+) failed", printed, re.M)
    said["terminal"] = tuple(int(match.group(i)) for i in (2, 3, 4))
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        match = re.fullmatch(r"(\d+) ok, (\d+) failed, (\d+) skipped", run.state.message)
        said["state"] = tuple(int(match.group(i)) for i in (1, 3, 2))
        runs = FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        artifacts = {artifact_role(a): a for a in client.read_artifacts(flow_run_filter=runs)}
    match = re.search(r"8/8 rows \(100\.0%\), (\d+) ok, (\d+) failed, (\d+) skipped", artifacts["progress"].description)
    said["progress"] = tuple(int(match.group(i)) for i in (1, 3, 2))
    summary_text = artifacts["summary"].data.replace("\\", "")
    match = re.search(r"rows: 8 = (\d+) rendered \+ (\d+) skipped \(already done\) \+ (\d+) failed", summary_text)
    said["summary artifact"] = tuple(int(match.group(i)) for i in (1, 2, 3))
    said["summary"] = (summary.rendered, summary.skipped, summary.failed)
    failed_table = markdown_table(artifacts["failed-rows"].data)
    said["failed-rows artifact"] = int(re.match(r"(\d+) failed rows", artifacts["failed-rows"].description).group(1))
    gallery = (out / "index.html").read_text()
    said["gallery"] = int(re.search(r"(\d+) failed</a>", gallery).group(1))
    lines = io.StringIO()
    export_records(str(out), stdout=lines)
    records = [json.loads(line) for line in lines.getvalue().splitlines()]
    said["records"] = sum(r["status"] == "failed" for r in records) + summary.without_record
    listed = {"summary": [f.row for f in summary.failures], "gallery": gallery, "summary artifact": summary_text,
              "failed-rows artifact": " ".join(row["sample rows"] for row in failed_table).replace("\\", "")}
    return said, listed, records


def test_counts_agree_everywhere(tmp_path, inputs_dir, models_env, prefect_api, capsys, monkeypatch):
    from ipaflow.flows.render import render_manifest

    manifest = write_manifest(tmp_path / "counted.parquet", _rows(inputs_dir, tmp_path))
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)  # the manifest given relative: records name it absolute
    for rendered, skipped in ((3, 0), (0, 3)):  # the run, then a re-run: done rows skipped, failed rows again
        state = render_manifest("counted.parquet", out=str(out), options={"shard_size": 2}, return_state=True)
        said, listed, records = _everywhere(state, out, capsys)
        figures = {place: value for place, value in said.items() if isinstance(value, tuple)}
        assert set(figures.values()) == {(rendered, skipped, 5)}, said
        assert {said["failed-rows artifact"], said["gallery"], said["records"]} == {5}, said
        assert sorted(r["id"] for r in records if r["status"] == "ok") == ["ok-0", "ok-1", "ok-2"]
        assert {r["manifest"] for r in records} == {str(manifest)}  # rendered and failed records name the file
        for place, text in listed.items():  # the rows without a record, by manifest row
            for name in ("manifest row 1", "manifest row 4", "dup (manifest row 5)"):
                assert name in str(text), (place, name, text)
