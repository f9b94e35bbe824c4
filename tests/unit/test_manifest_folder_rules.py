"""Manifests that are folders or globs of files: one stream in path order, Hive columns, relative inputs per
file, the whole-manifest rules across files naming file and row, type unification, marker files skipped."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ipaflow.flows.validate import validate_manifest
from ipaflow.specs.checks import as_job
from ipaflow.specs.manifest import ManifestError, open_manifest
from ipaflow.specs.registry import SpecRegistry
from ipaflow.specs.stream import resolve_stream

ROW = {"spec": "sdxl-text2img", "ip_image": "in.png", "num_inference_steps": 1}


def _parquet(path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _folder(tmp_path):
    root = tmp_path / "manifests"
    _parquet(root / "date=2026-12-02" / "part-0.parquet", [{**ROW, "id": "c", "seed": 3}])
    _parquet(root / "date=2026-12-01" / "part-1.parquet", [{**ROW, "id": "b", "seed": 2.0}])
    _parquet(root / "date=2026-12-01" / "part-0.parquet",
             [{**ROW, "id": "a", "style": None}, {**ROW, "id": "a2", "style": "ink"}])
    (root / "date=2026-12-01" / "_SUCCESS").write_text("")
    (root / "date=2026-12-01" / ".part-0.parquet.crc").write_bytes(b"\0")
    (root / "_temporary").mkdir()
    (root / "_temporary" / "part-9.parquet").write_text("half written")
    return root


def _jobs(uri: str):
    manifest = open_manifest(uri)
    return [as_job(job) for resolved in resolve_stream(manifest, SpecRegistry()) for job in resolved.jobs]


def test_folder_reads_files_in_path_order_with_hive_columns_and_relative_inputs(tmp_path):
    root = _folder(tmp_path)
    manifest = open_manifest(str(root))
    assert [f.name for f in manifest.files] == ["date=2026-12-01/part-0.parquet", "date=2026-12-01/part-1.parquet",
                                                "date=2026-12-02/part-0.parquet"]
    assert "date" in manifest.columns and "style" in manifest.columns and manifest.num_rows == 4
    jobs = _jobs(str(root) + "/")
    assert [j.id for j in jobs] == ["a", "a2", "b", "c"]
    assert [j.extra.get("date") for j in jobs] == ["2026-12-01", "2026-12-01", "2026-12-01", "2026-12-02"]
    assert jobs[1].extra["style"] == "ink" and jobs[0].extra.get("style") is None  # absent from a file: null
    assert jobs[0].inputs["ip_image"] == [str(root / "date=2026-12-01" / "in.png")]
    assert jobs[3].inputs["ip_image"] == [str(root / "date=2026-12-02" / "in.png")]
    assert validate_manifest(str(root), check_inputs=False) == ([], 4)


def test_glob_selects_files(tmp_path):
    root = _folder(tmp_path)
    assert [j.id for j in _jobs(str(root / "**" / "part-0.parquet"))] == ["a", "a2", "c"]
    with pytest.raises(ManifestError, match="no file matches"):
        open_manifest(str(root / "*.csv"))


def test_duplicate_id_across_files_names_both_files(tmp_path):
    root = _folder(tmp_path)
    _parquet(root / "date=2026-12-02" / "part-1.parquet", [{**ROW, "id": "x"}, {**ROW, "id": "b"}])
    failed, rows = validate_manifest(str(root), check_inputs=False)
    assert rows == 6
    assert [line for row in failed for line in row.lines()] == [
        "b, id, duplicate id (date=2026-12-01/part-1.parquet row 0, date=2026-12-02/part-1.parquet row 1)"] * 2


def test_formats_mix_and_missing_columns_are_null(tmp_path):
    root = tmp_path / "m"
    _parquet(root / "a.parquet", [{**ROW, "id": "a", "seed": 1}])
    (root / "b.jsonl").write_text(json.dumps({**ROW, "id": "b", "guidance_scale": 2.0}) + "\n")
    (root / "c.csv").write_text("id,spec,ip_image,num_inference_steps\nc,sdxl-text2img,in.png,1\n")
    assert [j.id for j in _jobs(str(root))] == ["a", "b", "c"]


def test_incompatible_types_name_both_files_and_the_column(tmp_path):
    root = tmp_path / "m"
    _parquet(root / "a.parquet", [{**ROW, "id": "a", "seed": 1}])
    _parquet(root / "b.parquet", [{**ROW, "id": "b", "seed": "one"}])
    with pytest.raises(ManifestError, match="column 'seed' is int in a.parquet but text in b.parquet"):
        open_manifest(str(root))


def test_empty_folder_and_file_without_required_column(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_SUCCESS").write_text("")
    with pytest.raises(ManifestError, match="holds no manifest file"):
        open_manifest(str(tmp_path / "empty"))
    _parquet(tmp_path / "m" / "a.parquet", [{"id": "a"}])
    with pytest.raises(ManifestError, match=r"a.parquet: missing required column\(s\) spec"):
        open_manifest(str(tmp_path / "m"))


def test_a_file_changed_after_listing_is_refused(tmp_path):
    root = _folder(tmp_path)
    manifest = open_manifest(str(root))
    _parquet(root / "date=2026-12-02" / "part-0.parquet", [{**ROW, "id": "c"}, {**ROW, "id": "d"}])
    with pytest.raises(ManifestError, match="changed while the run read it"):
        list(manifest.iter_batches())


def test_templates_fill_from_the_row_and_fail_naming_the_column():
    from ipaflow.core.problems import RowFailed
    from ipaflow.specs.templates import fill

    row = {"object": "cat", "n": 3.0, "empty": None}
    assert fill("prompt", "a {object} x{n} {{literal}}", row) == "a cat x3 {literal}"
    for template, reason in (("{missing}", "placeholder {missing}: column 'missing' is not a column of the manifest"),
                             ("{empty}", "placeholder {empty}: column 'empty' is empty in this row"),
                             ("{object.__class__}", "placeholder {object.__class__}: column 'object.__class__' is not"),
                             ("{object!r}", "not a column name in braces"), ("{0}", "not a column name in braces"),
                             ("a } b", "a lone '}'"), ("{object", "not a column name in braces")):
        with pytest.raises(RowFailed) as caught:
            fill("negative_prompt", template, row)
        assert caught.value.column == "negative_prompt" and reason in caught.value.problems[0].reason, template


def test_a_templated_row_fails_alone_naming_the_column(tmp_path):
    path = tmp_path / "m.parquet"
    _parquet(path, [{**ROW, "id": "a", "prompt": "{object}", "object": "cat"},
                    {**ROW, "id": "b", "prompt": "{object}", "object": None},
                    {**ROW, "id": "c", "prompt": "{colour}", "object": "owl"}])
    failed, _ = validate_manifest(str(path), check_inputs=False)
    assert [line for row in failed for line in row.lines()] == [
        "b, prompt, placeholder {object}: column 'object' is empty in this row",
        "c, prompt, placeholder {colour}: column 'colour' is not a column of the manifest"]


SWEPT = """name: swept
task: text2img
model: stabilityai/stable-diffusion-xl-base-1.0
ip_adapters:
  - {model: h94/IP-Adapter, subfolder: sdxl_models, weight_name: ip-adapter_sdxl.bin, scale: 0.6}
defaults: {num_inference_steps: 1, prompt: "a photo of {object}"}
sweep: {seed: [1, 2, 3], ip_scale: [0.3, 0.6]}
"""


def _swept_specs(tmp_path):
    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "swept.yaml").write_text(SWEPT)
    return str(folder)


def test_a_sweep_expands_each_row_in_product_order_with_derived_ids(tmp_path):
    from ipaflow.flows.open_run import open_run
    from ipaflow.specs.options import RenderOptions

    options = RenderOptions(specs=[_swept_specs(tmp_path)])
    path = tmp_path / "m.parquet"
    _parquet(path, [{"id": "cat", "spec": "swept", "ip_image": "in.png", "object": "cat", "seed": 9},
                    {"id": "plain", "spec": "sdxl-text2img", "ip_image": "in.png", "object": "x", "seed": 9}])
    run = open_run(str(path), options)
    assert run.census.rows == 7
    jobs = [as_job(job) for piece in resolve_stream(run.manifest, run.registry, run.census) for job in piece.jobs]
    assert [j.id for j in jobs] == [f"cat.s{k}" for k in range(6)] + ["plain"]
    assert [(j.seed, j.params["ip_adapter_scale"]) for j in jobs[:3]] == [(1, [0.3]), (1, [0.6]), (2, [0.3])]
    assert jobs[0].params["prompt"] == "a photo of cat" and jobs[0].extra["prompt_template"] == "a photo of {object}"
    assert jobs[6].seed == 9
    assert validate_manifest(str(path), options, check_inputs=False) == ([], 7)

    _parquet(path, [{"id": "cat", "spec": "swept", "ip_image": "in.png", "object": "cat"},
                    {"id": "cat.s4", "spec": "sdxl-text2img", "ip_image": "in.png"}])
    failed, rows = validate_manifest(str(path), options, check_inputs=False)
    assert rows == 7 and [row.row for row in failed] == ["cat.s4", "cat.s4"]
    assert failed[0].lines() == ["cat.s4, id, duplicate id (manifest rows 4, 6)"]


def test_a_sweep_of_an_unknown_parameter_is_refused(tmp_path):
    from ipaflow.specs.registry import SpecError, parse_spec

    with pytest.raises(SpecError, match="'scheduler' is not a row parameter"):
        parse_spec(SWEPT.replace("sweep: {seed", "sweep: {scheduler: [1], seed"), "swept.yaml")


def test_colliding_outputs_across_files_name_file_and_row(tmp_path):
    root = tmp_path / "m"
    _parquet(root / "a.parquet", [{**ROW, "id": "x", "num_images": 2}])
    _parquet(root / "b.parquet", [{**ROW, "id": "y"}, {**ROW, "id": "x-1", "num_images": 1}])
    failed, _ = validate_manifest(str(root), check_inputs=False)
    assert [line for row in failed for line in row.lines()] == [
        "x, id, its output x-1 (png) is also written by b.parquet row 1 (x-1); rename one",
        "x-1, id, its output x-1 (png) is also written by a.parquet row 0 (x); rename one"]
