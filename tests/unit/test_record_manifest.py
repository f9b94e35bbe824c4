"""A record names the manifest file its row came from (``manifest``): for a folder manifest the very file, which
is what an operator looks for days later; credentials in a URI are redacted."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from ipaflow.core.redaction import Redactor
from ipaflow.specs.checks import as_job
from ipaflow.specs.manifest import open_manifest
from ipaflow.specs.registry import SpecRegistry
from ipaflow.specs.stream import resolve_stream
from ipaflow.tasks.metadata_schema import CORE_SCHEMA, make_record

ROW = {"spec": "sdxl-text2img", "ip_image": "in.png", "num_inference_steps": 1}


def test_each_row_names_its_own_file_of_a_folder_manifest(tmp_path):
    root = tmp_path / "manifests"
    for name, ids in (("day=1/part-0.parquet", ["a", "b"]), ("day=2/part-0.parquet", ["c"])):
        (root / name).parent.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist([{**ROW, "id": i} for i in ids]), root / name)
    manifest = open_manifest(str(root))
    jobs = [as_job(job) for resolved in resolve_stream(manifest, SpecRegistry()) for job in resolved.jobs]
    assert {job.id: manifest.file_of(job.index) for job in jobs} == {
        "a": str(root / "day=1/part-0.parquet"), "b": str(root / "day=1/part-0.parquet"),
        "c": str(root / "day=2/part-0.parquet")}
    one = tmp_path / "one.parquet"
    pq.write_table(pa.Table.from_pylist([{**ROW, "id": "x"}]), one)
    assert open_manifest(str(one)).file_of(0) == str(one)


def test_the_record_field_is_redacted():
    assert "manifest" in CORE_SCHEMA.names
    redactor = Redactor(extra={"s3cret"})
    record = make_record(job_id="a", spec="s", status="ok", run_id="r", redact=redactor.redact,
                         manifest="https://host/m.parquet?X-Amz-Signature=s3cret")
    assert "s3cret" not in record["manifest"] and record["manifest"].startswith("https://host/m.parquet")
    assert make_record(job_id="a", spec="s", status="ok", run_id="r")["manifest"] is None
