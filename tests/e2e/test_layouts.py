"""Output layouts end to end: sharded folders, WebDataset tars and Parquet shards load with Hugging Face
`datasets`; re-runs resume by content key; a re-rendered row's old sample leaves its older container (one
current sample per id); `ipaflow records` gives the same rows as a plain read of metadata/."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import PIL.Image
import pytest
from util import read_records, write_manifest


def _rows(inputs_dir):
    return [{"id": f"row-{i}", "spec": "sdxl-text2img", "prompt": f"picture {i}", "num_inference_steps": 1,
             "ip_image": str(inputs_dir / ("bear.png", "diner.png")[i % 2]), "note": f"n{i}"} for i in range(3)] + [
        {"id": "row.dot", "spec": "sdxl-text2img", "prompt": "two of them", "num_inference_steps": 1, "num_images": 2,
         "ip_image": str(inputs_dir / "gummy.png"), "note": "d"}]


@pytest.fixture
def render(models_env, prefect_api):
    from ipaflow.flows.render import render_manifest

    def run(manifest, out, **options):
        summary = render_manifest(str(manifest), out=str(out), options={"batch_size": 4, **options})
        assert summary.failed == 0, summary.failures
        return summary

    return run


def _load(kind: str, files, cache: Path):
    from datasets import load_dataset

    return load_dataset(kind, data_files={"train": [str(f) for f in files]}, split="train", cache_dir=str(cache))


def _tar_keys(out: Path) -> list[str]:
    keys = []
    for path in sorted((out / "webdataset").glob("*.tar")):
        with tarfile.open(path) as tar:
            keys += [name.rsplit(".", 1)[0] for name in tar.getnames() if name.endswith(".png")]
    return sorted(keys)


def test_webdataset_resumes_and_keeps_one_sample_per_id(tmp_path, inputs_dir, render):
    out = tmp_path / "out"
    rows = _rows(inputs_dir)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    assert render(manifest, out, layout="webdataset").rendered == 4
    assert _tar_keys(out) == ["row%2Edot-0", "row%2Edot-1", "row-0", "row-1", "row-2"]
    assert not (out / "images").exists()
    records = read_records(out).set_index("id")
    assert set(records["layout"]) == {"webdataset"}
    tar_uri = records.loc["row-1", "outputs"][0]
    assert tar_uri.endswith(".tar#row-1.png") and list(records.loc["row.dot", "outputs"])[1].endswith("#row%2Edot-1.png")

    dataset = _load("webdataset", (out / "webdataset").glob("*.tar"), tmp_path / "hf")
    assert sorted(dataset["__key__"]) == ["row%2Edot-0", "row%2Edot-1", "row-0", "row-1", "row-2"]
    sample = dataset[0]
    assert isinstance(sample["png"], PIL.Image.Image) and sample["png"].size == (64, 64)
    assert sample["json"]["id"] in {"row-0", "row-1", "row-2", "row.dot"} and "prompt" in sample["json"]

    again = render(manifest, out, layout="webdataset")
    assert (again.rendered, again.skipped) == (0, 4)
    rows[1]["prompt"] = "edited"
    edited = render(write_manifest(tmp_path / "m.parquet", rows), out, layout="webdataset")
    assert (edited.rendered, edited.skipped) == (1, 3)
    assert _tar_keys(out) == ["row%2Edot-0", "row%2Edot-1", "row-0", "row-1", "row-2"]  # the old row-1 is gone
    records = read_records(out).set_index("id")
    assert len(records) == 4 and json.loads(records.loc["row-1", "params"])["prompt"] == "edited"
    container, member = records.loc["row-1", "outputs"][0].split("#")
    with tarfile.open(container) as tar:
        assert json.loads(tar.extractfile(member.replace(".png", ".json")).read())["prompt"] == "edited"


def test_parquet_layout_loads_with_datasets_and_resumes(tmp_path, inputs_dir, render):
    out = tmp_path / "out"
    rows = _rows(inputs_dir)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    render(manifest, out, layout="parquet")
    dataset = _load("parquet", (out / "parquet").glob("*.parquet"), tmp_path / "hf")
    assert sorted(dataset["id"]) == ["row-0", "row-1", "row-2", "row.dot", "row.dot"]
    assert isinstance(dataset[0]["image"], PIL.Image.Image) and dataset[0]["image"].size == (64, 64)
    assert json.loads(dataset[0]["json"])["spec"] == "sdxl-text2img"

    rows[3]["prompt"] = "edited"
    edited = render(write_manifest(tmp_path / "m.parquet", rows), out, layout="parquet")
    assert (edited.rendered, edited.skipped) == (1, 3)
    shards = pd.concat([pd.read_parquet(p) for p in (out / "parquet").glob("*.parquet")])
    assert sorted(shards["id"]) == ["row-0", "row-1", "row-2", "row.dot", "row.dot"]  # the old pair is gone
    assert {json.loads(text)["prompt"] for text in shards[shards["id"] == "row.dot"]["json"]} == {"edited"}


def test_sharded_layout_and_records_command(tmp_path, inputs_dir, render, capsys):
    from ipaflow.flows.cli import main
    from ipaflow.specs.outputs import shard_folder

    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "m.parquet", _rows(inputs_dir))
    render(manifest, out, layout="sharded")
    files = sorted(p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*.png"))
    assert files == sorted(f"{shard_folder(stem)}/{stem}.png" for stem in ("row-0", "row-1", "row-2", "row.dot-0",
                                                                           "row.dot-1"))
    dataset = _load("imagefolder", (out / "images").rglob("*.png"), tmp_path / "hf")
    assert len(dataset) == 5 and dataset[0]["image"].size == (64, 64)
    again = render(manifest, out, layout="sharded")
    assert (again.rendered, again.skipped) == (0, 4)
    moved = render(manifest, out)  # the files layout: the outputs are elsewhere, so the rows render again
    assert moved.rendered == 4 and (out / "images" / "row-0.png").exists()

    capsys.readouterr()
    assert main(["records", str(out), "--output", str(tmp_path / "r.csv")]) == 0
    assert main(["records", str(out)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    plain = read_records(out)
    assert sorted(r["id"] for r in printed) == sorted(plain["id"]) == ["row-0", "row-1", "row-2", "row.dot"]
    assert sorted(pd.read_csv(tmp_path / "r.csv")["id"]) == sorted(plain["id"])
    with PIL.Image.open(io.BytesIO((out / "images" / "row-0.png").read_bytes())) as image:
        assert json.loads(image.text["parameters"])["id"] == "row-0"
