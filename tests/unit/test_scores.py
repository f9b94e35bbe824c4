"""ip_similarity without a model: the arithmetic (mean of normalised prompt embeddings, frames averaged, the
row's weakest value), and where the score goes: records, each output's embedded parameters, the webdataset JSON
and the parquet rows, the image folder's metadata, records rebuilt from the outputs, the gallery's order; a
folder written before the score existed reads and takes new records."""

from __future__ import annotations

import io
import json
import tarfile

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from util import write_folder

from ipaflow.core.storage import Storage
from ipaflow.flows.records import export_records
from ipaflow.tasks.gallery import render_gallery
from ipaflow.tasks.metadata import MetadataStore
from ipaflow.tasks.metadata_rebuild import embedded_parameters
from ipaflow.tasks.metadata_schema import output_fields, record_similarities, weakest
from ipaflow.tasks.scores import cosines, prompt_direction, sampled_frames

SCORES = {"a": [[0.9]], "b": [[0.5], [0.1]], "c.d": [[0.3]]}


def test_the_arithmetic():
    e = torch.eye(3)
    # a style folder: the mean of the normalised embeddings (the scale of each image's embedding does not count)
    direction = prompt_direction(torch.stack([10 * e[0], e[1]]))
    assert torch.allclose(direction, (e[0] + e[1]) / 2 ** 0.5)
    # per output, per adapter; an output's frames averaged
    outputs = torch.stack([torch.stack([e[0], e[0]]), torch.stack([e[0], e[2]])])  # (2 outputs, 2 frames, 3)
    assert cosines(outputs, torch.stack([e[0], direction])) == [[1.0, 0.707107], [0.5, 0.353553]]
    assert [len(sampled_frames(list(range(n)))) for n in (1, 2, 3, 16)] == [1, 2, 3, 3]
    assert sampled_frames(list(range(16))) == [0, 8, 15]
    assert weakest([[0.5, 0.7], [0.2, 0.9]]) == 0.2 and weakest(None) is None
    assert output_fields([[0.5, 0.7]], 1) == [{"ip_similarity": 0.5, "ip_similarities": [0.5, 0.7]}]
    assert output_fields(None, 2) == [{}, {}]
    assert record_similarities(output_fields([[0.5], [0.2]], 2)) == [[0.5], [0.2]]
    assert record_similarities([{"ip_similarities": [0.5]}, {}]) is None  # one output without: none


def test_the_outputs_are_prepared_in_threads_exactly_as_by_the_processor():
    import numpy as np
    import PIL.Image
    from transformers import CLIPImageProcessor

    from ipaflow.tasks.scores import preprocess

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    images = [PIL.Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), np.uint8)) for i in range(5)]
    whole = processor(images, return_tensors="pt").pixel_values
    assert torch.equal(preprocess(processor, images, threads=3), whole)
    assert torch.equal(preprocess(processor, images, threads=1), whole)


def _records(store) -> dict[str, dict]:
    return {row_id: {k: r[k] for k in ("ip_similarity", "ip_similarities")} for row_id, r in store.load().items()}


def test_files_carry_the_score_in_records_embedded_parameters_and_the_image_folder_metadata(tmp_path):
    out = tmp_path / "out"
    store = write_folder(out, "files", scores=SCORES)
    assert _records(store) == {"a": {"ip_similarity": 0.9, "ip_similarities": [[0.9]]},
                               "b": {"ip_similarity": 0.1, "ip_similarities": [[0.5], [0.1]]},
                               "c.d": {"ip_similarity": 0.3, "ip_similarities": [[0.3]]}}
    assert embedded_parameters((out / "images" / "b-1.png").read_bytes(), "b-1.png")["ip_similarity"] == 0.1
    from ipaflow.tasks.card import write_card

    write_card(Storage(), str(out), store)
    folder = pq.read_table(out / "images" / "metadata.parquet").to_pylist()
    assert {(r["file_name"], r["ip_similarity"]) for r in folder} == {("a.png", 0.9), ("b-0.png", 0.5),
                                                                       ("b-1.png", 0.1), ("c.d.png", 0.3)}
    from datasets import load_dataset

    dataset = load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(dataset.filter(lambda row: row["ip_similarity"] >= 0.3)["ip_similarity"]) == [0.3, 0.5, 0.9]


def test_samples_carry_their_own_score(tmp_path):
    web = tmp_path / "web"
    write_folder(web, "webdataset", scores=SCORES)
    (shard,) = (web / "webdataset").glob("*.tar")
    with tarfile.open(shard) as tar:
        infos = {m.name: json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")}
    assert {name: info["ip_similarity"] for name, info in infos.items()} == \
        {"a.json": 0.9, "b-0.json": 0.5, "b-1.json": 0.1, "c%2Ed.json": 0.3}
    flat = tmp_path / "flat"
    write_folder(flat, "parquet", scores=SCORES)
    (shard,) = (flat / "parquet").glob("*.parquet")
    rows = pq.read_table(shard, columns=["id", "json"]).to_pylist()
    assert sorted((r["id"], json.loads(r["json"])["ip_similarities"]) for r in rows) == \
        [("a", [0.9]), ("b", [0.1]), ("b", [0.5]), ("c.d", [0.3])]


@pytest.mark.parametrize("layout", ["files", "webdataset"])
def test_records_rebuilt_from_the_outputs_keep_the_score(tmp_path, layout):
    out = tmp_path / "out"
    store = write_folder(out, layout, scores=SCORES)
    before = _records(store)
    (part,) = (out / "metadata").glob("part-*.parquet")
    part.write_bytes(part.read_bytes()[:-40])  # torn: rebuilt from the outputs
    store = MetadataStore(Storage(), str(out))
    store.repair(store.index())
    store.fold("r2-recovered")
    assert _records(store) == before


def test_a_folder_written_before_the_score_reads_and_takes_new_records(tmp_path, capsys):
    out = tmp_path / "out"
    write_folder(out, "files", rows=(("a", 1), ("b", 1)))
    for path in (out / "metadata").glob("*.parquet"):  # as the version before the score wrote them
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["ip_similarity", "ip_similarities"]), path)
    assert export_records(str(out), where="ip_similarity == null") == 2
    assert all(json.loads(line)["ip_similarity"] is None for line in capsys.readouterr().out.splitlines())

    store = write_folder(out, "files", rows=(("c", 1),), run="r2", scores={"c": [[0.25]]})
    frame = pd.read_parquet(out / "metadata").set_index("id")
    assert frame.loc["c", "ip_similarity"] == 0.25 and frame[["ip_similarity"]].loc[["a", "b"]].isna().all().all()
    assert sorted(store.load()) == ["a", "b", "c"]
    assert export_records(str(out), where="ip_similarity < 0.3") == 1
    store.journal_updates("r3", "u0", [{"id": "a", "note": "edited"}], ["note"])  # a passthrough edit of an old record
    store.fold("r3")
    assert store.load()["a"]["note"] == "edited" and store.load()["a"]["ip_similarity"] is None


def test_the_gallery_shows_the_score_and_sorts_weakest_first_without_script():
    out = "/renders/run"
    records = [{"id": row_id, "spec": "s", "status": "ok", "error": None, "params": json.dumps({"prompt": row_id}),
                "outputs": [f"{out}/images/{row_id}-{k}.png" for k in range(len(scores or [None]))], "ip_similarities": scores}
               for row_id, scores in [("a", [[0.9]]), ("b", [[0.5], [0.1]]), ("c", None)]]
    page = render_gallery(records, out)
    assert "<script" not in page and "#weakest:target .grid figure{order:var(--rank)}" in page
    ranks = [int(part.split("'", 1)[0]) for part in page.split("<figure style='--rank:")[1:]]
    assert ranks == [2, 1, 0, 3]  # a-0 (0.9), b-0 (0.5), b-1 (0.1), c-0 (unscored: last)
    assert "ip_similarity 0.100" in page and page.count("ip_similarity 0.") == 3
    assert "href='#weakest'" in page


def test_switching_the_score_does_not_change_the_key():
    from ipaflow.specs.registry import SpecRegistry

    spec = SpecRegistry().get("sdxl-text2img")
    assert spec.score and spec.model_copy(update={"score": False}).fingerprint() == spec.fingerprint()
    from ipaflow.specs.spec import Spec

    data = spec.model_dump(mode="json")
    assert Spec.model_validate({**data, "score": False}).score is False
    with pytest.raises(ValueError):
        Spec.model_validate({**data, "score": "sometimes"})


def test_export_is_streamed_per_part(tmp_path):
    """--where filters each part as it streams: the count is the matching records of every part."""
    out = tmp_path / "out"
    write_folder(out, "files", scores=SCORES)
    write_folder(out, "files", rows=(("e", 1), ("f", 1)), run="r2", scores={"e": [[0.05]], "f": [[0.6]]})
    buffer = io.StringIO()
    assert export_records(str(out), where="ip_similarity < 0.2", stdout=buffer) == 2
    assert sorted(json.loads(line)["id"] for line in buffer.getvalue().splitlines()) == ["b", "e"]
