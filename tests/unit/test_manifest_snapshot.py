"""One snapshot of the manifest per run: a one-file manifest is pinned when the run opens it, and the census and
the rows read exactly that file. A file replaced or rewritten underneath is one ``ManifestError`` naming it, never
rows judged against a census of another file (the issue's ``KeyError('sd15-full-face')``, or a duplicated id
rendered twice into one output); on a versioned bucket the pinned version is read whatever replaced it."""

from __future__ import annotations

import dataclasses
import io
import os
import uuid

import pandas as pd
import pytest
from s3 import client_env

from ipaflow.flows.open_run import judge_rows, open_run
from ipaflow.specs.manifest import ManifestError
from ipaflow.specs.options import RenderOptions


def _rows(count: int) -> list[dict]:
    return [{"id": f"bulk-{i:05d}", "spec": "sdxl-text2img", "prompt": f"p {i}", "ip_image": "diner.png"}
            for i in range(count)]


REPLACEMENTS = {  # the two cases: a spec the census never saw, and only a duplicated id
    "a new spec": [{"id": "bulk-00000", "spec": "sd15-full-face", "prompt": "new", "ip_image": "face.png"}],
    "a duplicated id": [{"id": "bulk-00002", "spec": "sdxl-text2img", "prompt": "x", "ip_image": "diner.png"}] * 2,
}


def _csv(rows: list[dict]) -> bytes:
    return pd.DataFrame(rows).to_csv(index=False).encode()


def _jsonl(rows: list[dict]) -> bytes:  # read line by line: a pass reads the object a block at a time
    return pd.DataFrame(rows).to_json(orient="records", lines=True).encode()


def _judged(manifest: str, options: RenderOptions | None = None) -> list:
    """Every row judged as a run judges them (census first, then the rows streamed), as (id, spec) of the rows
    to render and (id, reason) of the rejected ones."""
    run = open_run(manifest, options or RenderOptions())
    out = []
    for judged in judge_rows(run):
        out += [(job.id, job.spec) for job, _ in judged.to_render]
        out += [(r.failed.row, r.failed.error) for r in judged.rejected]
    return out


def _in_batches_of_1000(run):
    run.manifest = dataclasses.replace(run.manifest, batch_rows=1000)
    return run


def _swapping_after_census(run, swap):
    """The run's census, then the swap: what happens to a file replaced once the run has started."""
    census = run.census
    swap()
    return census


@pytest.mark.parametrize("replacement", sorted(REPLACEMENTS))
def test_a_file_replaced_by_mv_after_the_run_opened_it_is_one_error(tmp_path, replacement):
    manifest, small = tmp_path / "m.csv", tmp_path / "small.csv"
    manifest.write_bytes(_csv(_rows(3000)))
    small.write_bytes(_csv(REPLACEMENTS[replacement]))
    run = open_run(str(manifest), RenderOptions())
    _swapping_after_census(run, lambda: os.replace(small, manifest))
    with pytest.raises(ManifestError, match=f"^{manifest}: the manifest file changed while the run read it"):
        list(judge_rows(run))


@pytest.mark.parametrize("replacement", sorted(REPLACEMENTS))
def test_a_file_rewritten_in_place_while_rows_stream_stops_at_the_next_batch(tmp_path, replacement):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(_csv(_rows(5000)))
    run = _in_batches_of_1000(open_run(str(manifest), RenderOptions()))
    pieces = judge_rows(run)
    first = next(pieces)
    assert first.rows and all(spec == "sdxl-text2img" for _, spec in [(j.id, j.spec) for j, _ in first.to_render])
    with open(manifest, "r+b") as handle:  # the same file (inode), another content: cp small m.csv
        handle.write(_csv(REPLACEMENTS[replacement]))
        handle.truncate()
    with pytest.raises(ManifestError, match="changed while the run read it"):
        list(pieces)


def test_a_file_replaced_by_mv_while_a_pass_reads_it_is_read_as_pinned(tmp_path):
    """The pass's open handle holds the pinned file: it reads on to its end, the rows the census counted."""
    manifest, small = tmp_path / "m.csv", tmp_path / "small.csv"
    manifest.write_bytes(_csv(_rows(3000)))
    small.write_bytes(_csv(REPLACEMENTS["a new spec"]))
    run = _in_batches_of_1000(open_run(str(manifest), RenderOptions()))
    pieces = judge_rows(run)
    seen = len(next(pieces).to_render)
    os.replace(small, manifest)
    seen += sum(len(judged.to_render) for judged in pieces)
    assert seen == run.census.rows == 3000


@pytest.fixture
def s3_env(moto, monkeypatch):
    for name, value in client_env(moto).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("ipaflow.specs.manifest_files.READ_BLOCK", 4096)  # several range requests per pass


def test_an_object_replaced_while_the_run_reads_it_is_one_error(moto, s3_env):
    """Each range request carries If-Match: the replacement fails the next read, one error naming the object."""
    bucket = moto.bucket(f"ipaflow-{uuid.uuid4().hex[:10]}")
    moto.put(bucket, "m.jsonl", _jsonl(_rows(3000)))
    uri = f"s3://{bucket}/m.jsonl"
    run = _in_batches_of_1000(open_run(uri, RenderOptions()))
    pieces = judge_rows(run)
    assert next(pieces).rows == 1000
    moto.put(bucket, "m.jsonl", _jsonl(REPLACEMENTS["a new spec"]))
    with pytest.raises(ManifestError, match=f"^{uri}: the manifest file changed while the run read it"):
        list(pieces)


def test_on_a_versioned_bucket_the_pinned_version_is_read(moto, s3_env):
    """Replaced once the run opened it, before the census: the census and the rows read the version pinned."""
    bucket = moto.bucket(f"ipaflow-{uuid.uuid4().hex[:10]}")
    moto.client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    moto.put(bucket, "m.jsonl", _jsonl(_rows(3000)))
    run = _in_batches_of_1000(open_run(f"s3://{bucket}/m.jsonl", RenderOptions()))
    moto.put(bucket, "m.jsonl", _jsonl(REPLACEMENTS["a new spec"]))
    assert run.manifest.files[0].version  # read by its version id
    judged = list(judge_rows(run))
    assert sum(piece.rows for piece in judged) == run.census.rows == 3000
    assert {job.spec for piece in judged for job, _ in piece.to_render} == {"sdxl-text2img"}


def test_a_parquet_object_replaced_after_the_census_is_one_error(moto, s3_env):
    bucket = moto.bucket(f"ipaflow-{uuid.uuid4().hex[:10]}")
    buffer = io.BytesIO()
    pd.DataFrame(_rows(3000)).to_parquet(buffer, index=False, row_group_size=500)
    moto.put(bucket, "m.parquet", buffer.getvalue())
    run = open_run(f"s3://{bucket}/m.parquet", RenderOptions())
    small = io.BytesIO()
    pd.DataFrame(REPLACEMENTS["a duplicated id"]).to_parquet(small, index=False)
    _swapping_after_census(run, lambda: moto.put(bucket, "m.parquet", small.getvalue()))
    with pytest.raises(ManifestError, match="changed while the run read it"):
        list(judge_rows(run))
