"""The streaming resolution (vectorised checks, census, fast job building) accepts exactly the rows the reference
rules of ``specs.rows.resolve_rows`` accept, with the same jobs and the same messages, whatever the format and
however the manifest is cut into batches."""

from __future__ import annotations

import dataclasses
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from property_rows import REGISTRY
from property_rows import rows as mixed_rows

from ipaflow.core.storage import Storage
from ipaflow.specs.checks import as_job
from ipaflow.specs.manifest import open_manifest
from ipaflow.specs.outputs import collision_key
from ipaflow.specs.rows import resolve_rows
from ipaflow.specs.stream import resolve_stream

SPECS = ["sdxl-text2img", "sdxl-img2img", "sdxl-inpaint", "animatediff-video", "sdxl-multi-style-face",
         "sd15-controlnet-depth", "nope"]
URIS = ["a.png", "/abs/b.png", "s3://bucket/c.png", " pad.png", "", "[\"x.png\"]", "a\x00b.png", "dir/d.png", "é.png",
        "line\nbreak.png"]


def _maybe(strategy):
    return st.one_of(st.none(), strategy)


# Per column: a good value, and edge values (some good, most not); a row takes the good one mostly.
GOOD = {"prompt": "a picture", "num_inference_steps": 2, "width": 64, "guidance_scale": 7.5, "strength": 0.5,
        "num_images": 1, "num_frames": 8, "seed": 3, "ip_image": "a.png", "image": "b.png", "mask": "m.png",
        "style_folder": "s3://bucket/style/", "control_image": "/abs/d.png", "ip_scale": 0.5, "note": "n"}
EDGES = {
    "prompt": st.text(max_size=8),
    "num_inference_steps": st.sampled_from([1, 1000, 0, 1001, -3]),
    "width": st.sampled_from([8, 8192, 100, 0, 8200]),
    "guidance_scale": st.sampled_from([0.0, 100.0, 100.5, -1.0, math.nan, math.inf]),
    "strength": st.sampled_from([1.0, 0.0, 1.5, 0.3, 0.4999]),  # x 2 steps: 0 denoising steps
    "num_images": st.sampled_from([2, 3, 64, 65, 0]),
    "num_frames": st.sampled_from([1, 512, 0, 600]),
    "seed": st.sampled_from([0, 2**62, 2**63 - 1, -1]),
    "ip_scale": st.sampled_from([0.0, 10.0, 11.0, -0.5, math.nan]),
    "note": st.sampled_from(["m", "x" * 3]),
    **dict.fromkeys(["ip_image", "image", "mask", "style_folder", "control_image"], st.sampled_from(URIS)),
}
IDS = ["a", "b", "a-0", "a-1", "row.1", "con", "CON.png", ".h", "x" * 129, "007", "b-0", "-z", "_y",
       "A", "A-0", "B-1", "Row.1", "nl\n", "CON\n"]  # ids that differ only in case are the same id


@st.composite
def typed_rows(draw):
    """Rows whose columns each hold one type (as Parquet and CSV give them): mostly good values, some edges."""
    n = draw(st.integers(1, 8))
    inputs = ["ip_image", "image", "mask", "style_folder", "control_image"]
    chosen = inputs + draw(st.lists(st.sampled_from(sorted(set(GOOD) - set(inputs))), unique=True))
    rows = []
    for number in range(n):
        row = {"id": draw(st.sampled_from([f"r{number}"] * 6 + IDS + [None])),
               "spec": draw(st.sampled_from(SPECS[:-1] * 3 + SPECS[-1:] + [None]))}
        for column in chosen:
            kind = draw(st.sampled_from(["good"] * 6 + ["edge", "edge", "null"]))
            row[column] = GOOD[column] if kind == "good" else draw(EDGES[column]) if kind == "edge" else None
        rows.append(row)
    return rows


@st.composite
def list_rows(draw):
    """Typed rows with list columns (image prompts, per-adapter scales), as Parquet list columns give them."""
    rows = draw(typed_rows())
    for row in rows:
        row["ip_image"] = draw(_maybe(st.lists(st.sampled_from(URIS), max_size=3)))
        row["ip_scale"] = draw(_maybe(st.lists(st.sampled_from([0.3, 0.7, 12.0]), max_size=3)))
    return rows


def _reference(manifest):
    rows = (row for batch in manifest.iter_batches() for row in batch.rows())  # plain values, manifest order
    return resolve_rows(rows, REGISTRY, manifest.base)


def _streamed(manifest):
    jobs, failed = [], []
    for resolved in resolve_stream(manifest, REGISTRY, piece=2):  # batches cut in pieces, as 32k-row ones are
        jobs.extend(as_job(job) for job in resolved.jobs)
        failed.extend(resolved.failed)
    return jobs, failed


def _same_outcome(manifest, batch_rows):
    manifest = dataclasses.replace(manifest, batch_rows=batch_rows)
    want_jobs, want_failed = _reference(manifest)
    jobs, failed = _streamed(manifest)
    assert [f.index for f in failed] == [f.index for f in want_failed]
    assert failed == want_failed  # the same rows, labels, specs and messages
    assert [job.model_dump_json() for job in jobs] == [job.model_dump_json() for job in want_jobs]
    for job, want in zip(jobs, want_jobs):  # the same Python types (5 and 5.0 give different keys)
        assert json.dumps(job.params, sort_keys=True) == json.dumps(want.params, sort_keys=True)
        assert json.dumps(job.extra, sort_keys=True, default=repr) == json.dumps(want.extra, sort_keys=True, default=repr)
    return jobs, failed


def _write_jsonl(rows, path):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def _check(rows, tmp_path_factory, batch_rows):
    folder = tmp_path_factory.mktemp("m")
    _same_outcome(open_manifest(str(_write_jsonl(rows, folder / "m.jsonl")), Storage()), batch_rows)
    try:
        pq.write_table(pa.Table.from_pylist(rows), folder / "m.parquet")
    except (pa.ArrowException, OverflowError, ValueError, TypeError):
        return  # not a table Parquet can hold (mixed types, an empty struct)
    _same_outcome(open_manifest(str(folder / "m.parquet"), Storage()), batch_rows)


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(typed_rows(), st.integers(1, 5))
def test_typed_columns_stream_like_the_reference(tmp_path_factory, rows, batch_rows):
    _check(rows, tmp_path_factory, batch_rows)


@PROPERTY
@given(list_rows(), st.integers(1, 5))
def test_list_columns_stream_like_the_reference(tmp_path_factory, rows, batch_rows):
    _check(rows, tmp_path_factory, batch_rows)


@PROPERTY
@given(mixed_rows(), st.integers(1, 5))
def test_mixed_cells_stream_like_the_reference(tmp_path_factory, rows, batch_rows):
    _check(json.loads(json.dumps(rows)), tmp_path_factory, batch_rows)  # as a JSON Lines file holds them


def test_valid_typed_rows_take_the_vectorised_path(tmp_path):
    """The pre-filter vouches for ordinary rows (else it would pay nothing at scale)."""
    import numpy as np

    from ipaflow.specs.checks import vouch

    rows = [{"id": f"r{i}", "spec": "sdxl-text2img", "prompt": "p", "ip_image": "a.png", "num_inference_steps": 2,
             "guidance_scale": 5.0, "seed": i, "ip_scale": 0.5, "note": "n"} for i in range(50)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    manifest = open_manifest(str(tmp_path / "m.parquet"), Storage())
    assert np.mean(vouch(next(manifest.iter_batches()), REGISTRY)) == 1.0
    jobs, failed = _same_outcome(manifest, 7)
    assert len(jobs) == 50 and not failed


def test_the_collision_key_decides_duplicates_and_collisions(tmp_path, monkeypatch):
    """One function says when two ids or stems are the same: changing it changes both rules, in both paths."""
    rows = [{"id": "A", "spec": "sdxl-text2img", "ip_image": "a.png"},
            {"id": "a", "spec": "sdxl-text2img", "ip_image": "a.png"},
            {"id": "b", "spec": "sdxl-text2img", "ip_image": "a.png", "num_images": 2},
            {"id": "B-1", "spec": "sdxl-text2img", "ip_image": "a.png"}]
    manifest = open_manifest(str(_write_jsonl(rows, tmp_path / "m.jsonl")), Storage())
    jobs, failed = _same_outcome(manifest, 2)
    assert [(f.row, f.problems[0].reason.split(" (")[0]) for f in failed] == [
        ("A", "duplicate id: 'A', 'a' differ only in case"), ("a", "duplicate id: 'A', 'a' differ only in case"),
        ("b", "its output b-1"), ("B-1", "its output B-1")]
    assert [str(f.problems[0]) for f in failed[:1]] == ["id: duplicate id: 'A', 'a' differ only in case (manifest rows 0, 1)"]
    for module in ("ipaflow.specs.rows", "ipaflow.specs.census"):
        monkeypatch.setattr(f"{module}.collision_key", lambda stem: stem)  # exact: the rules follow it
    jobs, failed = _same_outcome(manifest, 2)
    assert not failed and len(jobs) == 4


@PROPERTY
@given(st.lists(st.sampled_from(["a", "A", "a-0", "A-1", "b", "B", "B-0", "Ab.c", "aB.C"]), min_size=1, max_size=8),
       st.lists(st.sampled_from([1, 2, 3]), min_size=8, max_size=8), st.integers(1, 4))
def test_mixed_case_ids_stream_like_the_reference(tmp_path_factory, ids, counts, batch_rows):
    """Ids and stems that differ only in case: the hashed census finds exactly the duplicates and collisions
    the reference rules find, with the same messages."""
    rows = [{"id": row_id, "spec": "sdxl-text2img", "ip_image": "a.png", "num_images": count}
            for row_id, count in zip(ids, counts)]
    _check(rows, tmp_path_factory, batch_rows)
    keys = [collision_key(row_id) for row_id in ids]
    if len(set(keys)) < len(keys):  # some ids differ only in case (or repeat): they fail, in both paths
        folder = tmp_path_factory.mktemp("dup")
        failed = _reference(open_manifest(str(_write_jsonl(rows, folder / "m.jsonl")), Storage()))[1]
        assert {f.index for f in failed} >= {i for i, key in enumerate(keys) if keys.count(key) > 1}
