"""The dataset card: README.md's front matter lets ``datasets.load_dataset(OUT)`` load the current outputs with
their id, prompt and parameters, in every layout, and nothing a current record does not name."""

from __future__ import annotations

import json

import pytest
import yaml
from util import write_folder

from ipaflow.core.storage import Storage
from ipaflow.tasks.card import write_card


def _load(out, cache, *name):
    from datasets import load_dataset

    return load_dataset(str(out), *name, split="train", cache_dir=str(cache))


def _front(out) -> dict:
    return yaml.safe_load((out / "README.md").read_text().split("---\n")[1])


@pytest.mark.parametrize("layout", ["files", "sharded"])
def test_an_image_folder_loads_with_its_records_and_only_current_outputs(tmp_path, layout):
    out = tmp_path / "out"
    write_folder(out, layout)
    (out / "images" / "stray.png").write_bytes((next((out / "images").rglob("a.png"))).read_bytes())
    write_card(Storage(), str(out))
    front = _front(out)
    assert front["configs"] == [{"config_name": "images", "data_files": [{"split": "train", "path": "images/**"}],
                                 "default": True}]
    assert front["ipaflow"]["records"] == {"ok": 3} and front["ipaflow"]["outputs"] == {"images": 4}
    assert front["ipaflow"]["specs"] == ["sdxl-text2img"]
    dataset = _load(out, tmp_path / "hf")
    assert sorted(dataset["id"]) == ["a", "b", "b", "c.d"]  # not the stray image
    row = dataset[dataset["id"].index("c.d")]
    assert row["prompt"] == "p c.d" and json.loads(row["params"])["num_images"] == 1 and row["key"] == "k-c.d"
    assert row["image"].size == (8, 8)


def test_webdataset_loads_from_the_card(tmp_path):
    out = tmp_path / "out"
    write_folder(out, "webdataset")
    write_card(Storage(), str(out))
    assert [c["config_name"] for c in _front(out)["configs"]] == ["webdataset"]
    dataset = _load(out, tmp_path / "hf")
    assert sorted(sample["id"] for sample in dataset["json"]) == ["a", "b", "b", "c.d"]
    assert dataset[0]["png"].size == (8, 8) and "prompt" in dataset[0]["json"]


def test_parquet_loads_from_the_card_and_another_layout_is_named(tmp_path):
    out = tmp_path / "out"
    write_folder(out, "parquet")
    write_folder(out, "files", rows=(("e", 1),), run="r2")
    write_card(Storage(), str(out))
    front = _front(out)
    assert [c["config_name"] for c in front["configs"]] == ["parquet"]  # the most outputs: the default
    assert front["ipaflow"]["other_layouts"] == {"images": {"builder": "imagefolder", "data_files": "images/**"}}
    shards = _load(out, tmp_path / "hf")
    assert sorted(shards["id"]) == ["a", "b", "b", "c.d"] and shards[0]["image"].size == (8, 8)
    from datasets import load_dataset

    images = load_dataset("imagefolder", data_files=str(out / "images/**"), split="train", cache_dir=str(tmp_path))
    assert images["id"] == ["e"]
