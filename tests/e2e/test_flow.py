"""The render flow end to end on local storage: outputs, metadata, determinism, resume."""

from __future__ import annotations

import json

import pandas as pd
import PIL.Image
import pytest
from util import output_names, read_records, write_manifest

STEPS = 2


def _rows(inputs_dir, n=6):
    images = ["diner.png", "bear.png", "gummy.png", "face.png"]
    return [
        {
            "id": f"row-{i}",
            "spec": "sdxl-text2img",
            "prompt": f"a picture number {i}",
            "ip_image": str(inputs_dir / images[i % len(images)]),
            "num_inference_steps": STEPS,
            "batch_note": f"note {i}",  # passthrough column
        }
        for i in range(n)
    ]


@pytest.fixture
def render(models_env, prefect_api):
    from ipaflow.flows.render import render_manifest

    def run(manifest, out, **options):
        return render_manifest(str(manifest), out=str(out), options=options)

    return run


def test_renders_outputs_and_one_record_per_row(tmp_path, inputs_dir, render):
    rows = _rows(inputs_dir)
    rows[2]["num_images"] = 2
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    summary = render(manifest, tmp_path / "out", batch_size=4)
    assert (summary.rendered, summary.failed, summary.skipped) == (6, 0, 0)

    records = read_records(tmp_path / "out").set_index("id")
    assert sorted(records.index) == [f"row-{i}" for i in range(6)]
    for column in ("spec", "status", "error", "outputs", "seed", "params", "key", "elapsed_s", "batch_size",
                   "finished_at", "batch_note"):
        assert column in records.columns, column
    assert set(records["status"]) == {"ok"} and records["error"].isna().all()
    assert records.loc["row-3", "batch_note"] == "note 3"
    assert list(records.loc["row-2", "outputs"]) == [
        str(tmp_path / "out" / "images" / "row-2-0.png"),
        str(tmp_path / "out" / "images" / "row-2-1.png"),
    ]
    assert records["batch_size"].max() > 1  # rows were micro-batched
    for outputs in records["outputs"]:
        for uri in outputs:
            image = PIL.Image.open(uri)
            assert image.size == (64, 64)
            assert json.loads(image.text["parameters"])["spec"] == "sdxl-text2img"
    params = json.loads(records.loc["row-0", "params"])
    assert params["prompt"] == "a picture number 0" and params["num_inference_steps"] == STEPS
    gallery = (tmp_path / "out" / "index.html").read_text()
    assert "row-5" in gallery and "a picture number 5" in gallery
    assert "href='contact-sheet.png'" in gallery and (tmp_path / "out" / "contact-sheet.png").exists()
    assert not list((tmp_path / "out").rglob("*.partial"))


def test_same_manifest_gives_identical_bytes(tmp_path, inputs_dir, render):
    manifest = write_manifest(tmp_path / "m.parquet", _rows(inputs_dir, 4))
    render(manifest, tmp_path / "a", batch_size=4)
    render(manifest, tmp_path / "b", batch_size=4)
    names = output_names(tmp_path / "a" / "images")
    assert names == output_names(tmp_path / "b" / "images") and len(names) == 4
    for name in names:
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()


def _mtimes(out):
    return {name: (out / "images" / name).stat().st_mtime_ns for name in output_names(out / "images")}


def test_rerun_renders_only_what_changed(tmp_path, inputs_dir, render):
    out = tmp_path / "out"
    rows = _rows(inputs_dir, 4)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    first = render(manifest, out)
    assert first.rendered == 4
    before = _mtimes(out)

    again = render(manifest, out)
    assert (again.rendered, again.skipped) == (0, 4)
    assert _mtimes(out) == before

    rows[1]["prompt"] = "an edited prompt"
    rows.append({**rows[0], "id": "row-new", "prompt": "a new row"})
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    edited = render(manifest, out)
    assert (edited.rendered, edited.skipped) == (2, 3)
    after = _mtimes(out)
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed == {"row-1.png", "row-new.png"}

    records = read_records(out)
    assert len(records) == 5 and records["id"].is_unique
    assert json.loads(records.set_index("id").loc["row-1", "params"])["prompt"] == "an edited prompt"

    everything = render(manifest, out, overwrite=True)
    assert everything.rendered == 5
    assert len(read_records(out)) == 5


def test_deleted_output_renders_again(tmp_path, inputs_dir, render):
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "m.parquet", _rows(inputs_dir, 2))
    render(manifest, out)
    (out / "images" / "row-0.png").unlink()
    again = render(manifest, out)
    assert (again.rendered, again.skipped) == (1, 1)
    assert (out / "images" / "row-0.png").exists()


def test_changed_input_file_renders_again(tmp_path, inputs_dir, render):
    out = tmp_path / "out"
    image = tmp_path / "input.png"
    PIL.Image.open(inputs_dir / "diner.png").save(image)
    rows = _rows(inputs_dir, 2)
    rows[0]["ip_image"] = str(image)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    render(manifest, out)
    PIL.Image.open(inputs_dir / "bear.png").save(image)
    again = render(manifest, out)
    assert (again.rendered, again.skipped) == (1, 1)


def test_csv_and_jsonl_manifests(tmp_path, inputs_dir, render):
    rows = _rows(inputs_dir, 2)
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    pd.DataFrame(rows).to_json(tmp_path / "m.jsonl", orient="records", lines=True)
    for name in ("m.csv", "m.jsonl"):
        summary = render(tmp_path / name, tmp_path / f"out-{name}")
        assert summary.rendered == 2, summary


def test_a_spec_that_cannot_load_fails_its_rows_at_once(tmp_path, inputs_dir, render):
    """Fail fast: the first shard that cannot build the pipeline tells the flow, which fails the spec's other
    rows with the same reason instead of starting a task per shard that would try the same load."""
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "broken.yaml").write_text("name: broken\ntask: text2img\nmodel: nowhere/no-such-model\n"
                                       "ip_adapters: [{model: h94/IP-Adapter, subfolder: models, "
                                       "weight_name: ip-adapter_sd15.safetensors}]\n")
    rows = [{**row, "spec": "broken"} for row in _rows(inputs_dir, 10)] + _rows(inputs_dir, 1)
    rows[-1]["id"] = "fine"
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    summary = render(manifest, tmp_path / "out", specs=[str(specs)], shard_size=2, batch_size=2)
    assert (summary.failed, summary.rendered) == (10, 1)
    broken = [s for s in summary.shards if s.spec == "broken"]
    assert 1 <= len(broken) <= 2 < 5  # 5 shards planned: at most the ones already in flight ran
    records = read_records(tmp_path / "out").set_index("id")
    reasons = set(records.loc[[f"row-{i}" for i in range(10)], "error"])
    assert len(reasons) == 1 and reasons.pop().startswith("pipeline: ")
    assert records.loc["fine", "status"] == "ok"
