"""ip_similarity on the tiny zoo: an output scored against its own image prompt gives 1.0 and beats an unrelated
one (by construction: the output is the image prompt), with the encoder's projection whatever the adapter takes;
one value per adapter; a video over its sampled frames; `score: false` gives null with no encoder pass for the
outputs; end to end the records, the webdataset JSON and the parquet rows carry it, and switching `score` renders
nothing again."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pandas as pd
import PIL.Image
import pyarrow.parquet as pq
import pytest
from util import read_records, write_manifest

from ipaflow.specs.registry import SpecRegistry
from ipaflow.tasks.inputs import RowInputs
from ipaflow.tasks.pipelines import PIPELINES
from ipaflow.tasks.scores import score_rows


def _image(inputs_dir: Path, name: str) -> PIL.Image.Image:
    return PIL.Image.open(inputs_dir / name).convert("RGB")


class _EncoderPasses(list):
    """Per pass of the pipeline's image encoder, the images it saw (a forward hook; ``hook.remove()`` after)."""

    def __init__(self, loaded):
        super().__init__()
        self.hook = loaded.pipe.image_encoder.register_forward_hook(lambda m, args, out: self.append(args[0].shape[0]))


_encoder_passes = _EncoderPasses


@pytest.mark.parametrize("spec", ["sdxl-text2img", "sd15-plus-face"])  # image embeds / hidden states adapters
def test_an_output_scores_highest_against_its_own_image_prompt(models_env, inputs_dir, spec):
    loaded = PIPELINES.get(SpecRegistry().get(spec))
    bear, diner, face = (_image(inputs_dir, n) for n in ("bear.png", "diner.png", "face.png"))
    prompt = RowInputs(adapters=[("bear", [bear])])
    loaded.embeddings.clear()
    passes = _encoder_passes(loaded)
    try:
        scores = score_rows(loaded, [prompt, prompt], [[bear, diner], [face]])
    finally:
        passes.hook.remove()
    (itself, unrelated), (other,) = scores[0], scores[1]
    assert itself == [pytest.approx(1.0, abs=1e-4)] and unrelated[0] < itself[0] and other[0] < itself[0]
    assert passes == [3, 1]  # the batch's outputs in one pass; the image prompt once (then cached)
    assert score_rows(loaded, [prompt], [[diner]])[0] == [unrelated]  # same score alone; prompt from the cache
    assert loaded.embeddings.encoded == 1


def test_multi_adapter_style_folder_and_video(models_env, inputs_dir):
    from ipaflow.tasks.render import render_rows

    loaded = PIPELINES.get(SpecRegistry().get("sdxl-multi-style-face"))
    style = [_image(inputs_dir, f"style/img{i}.png") for i in range(4)]
    face = _image(inputs_dir, "face.png")
    row = RowInputs(adapters=[("style", style), ("face", [face])])
    [[style_score, face_score]] = score_rows(loaded, [row], [[face]])[0]
    assert face_score == pytest.approx(1.0, abs=1e-4) and style_score < face_score

    video = PIPELINES.get(SpecRegistry().get("animatediff-video"))
    bear, diner = _image(inputs_dir, "bear.png"), _image(inputs_dir, "diner.png")
    prompt = RowInputs(adapters=[("bear", [bear])])
    [[still]], [[mixed]] = score_rows(video, [prompt, prompt], [[bear] * 5, [bear, diner, diner, diner, bear]])
    assert still == pytest.approx(1.0, abs=1e-4) and mixed < still  # first, middle, last: bear, diner, bear

    from ipaflow.core.storage import Storage
    from ipaflow.specs.rows import resolve_rows
    from ipaflow.tasks.inputs import InputFetcher

    registry = SpecRegistry()
    jobs, bad = resolve_rows([{"id": "m", "spec": "sdxl-multi-style-face", "prompt": "hero", "num_inference_steps": 2,
                               "style_folder": str(inputs_dir / "style"), "ip_image": str(inputs_dir / "face.png")}],
                             registry)
    assert not bad
    fetcher = InputFetcher(Storage(), jobs, {"sdxl-multi-style-face": registry.get("sdxl-multi-style-face")})
    fetcher.prefetch(jobs)
    inputs = [fetcher.get(job) for job in jobs]
    fetcher.close()
    [scored] = render_rows(loaded, jobs, inputs)
    assert len(scored.similarities) == 1 and len(scored.similarities[0]) == 2  # one output, one value per adapter
    passes = _encoder_passes(loaded)
    try:
        [unscored] = render_rows(loaded, jobs, inputs, score=False)
    finally:
        passes.hook.remove()
    assert unscored.similarities is None and passes == []  # prompts cached from the first render, no output pass


@pytest.fixture(scope="module")
def specs_dir(tmp_path_factory) -> Path:
    """sdxl-text2img as user specs: `scored` (the default) and `unscored` (`score: false`)."""
    bundled = Path(SpecRegistry().source("sdxl-text2img")).read_text()
    folder = tmp_path_factory.mktemp("specs")
    for name, extra in (("scored", ""), ("unscored", "score: false\n")):
        (folder / f"{name}.yaml").write_text(bundled.replace("name: sdxl-text2img", f"name: {name}") + extra)
    return folder


def test_records_samples_and_rows_carry_the_score(models_env, prefect_api, inputs_dir, specs_dir, tmp_path):
    from ipaflow.flows.render import render_manifest

    rows = [{"id": "two", "spec": "scored", "prompt": "a bear", "ip_image": str(inputs_dir / "bear.png"),
             "num_images": 2, "num_inference_steps": 2},
            {"id": "off", "spec": "unscored", "prompt": "a diner", "ip_image": str(inputs_dir / "diner.png"),
             "num_inference_steps": 2}]
    manifest = write_manifest(tmp_path / "m.parquet", rows)

    def render(out, **options):
        return render_manifest(str(manifest), out=str(out), options={"specs": [str(specs_dir)], **options})

    out = tmp_path / "out"
    assert render(out, layout="webdataset")["rendered"] == 2
    records = read_records(out).set_index("id")
    two = records.loc["two"]
    assert [len(values) for values in two["ip_similarities"]] == [1, 1]  # per output, per adapter
    assert all(-1 <= v[0] <= 1 for v in two["ip_similarities"])
    assert two["ip_similarity"] == min(v[0] for v in two["ip_similarities"])
    assert pd.isna(records.loc["off", "ip_similarity"]) and records.loc["off", "ip_similarities"] is None
    samples = {}
    for path in (out / "webdataset").glob("*.tar"):
        with tarfile.open(path) as tar:
            samples.update({m.name: json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")})
    assert [samples[f"two-{k}.json"]["ip_similarities"] for k in (0, 1)] == [list(v) for v in two["ip_similarities"]]
    assert "ip_similarity" not in samples["off.json"]

    (specs_dir / "unscored.yaml").write_text((specs_dir / "scored.yaml").read_text().replace("name: scored",
                                                                                             "name: unscored"))
    again = render(out, layout="webdataset")
    assert (again["rendered"], again["skipped"]) == (0, 2)  # the score is not part of the key
    assert pd.isna(read_records(out).set_index("id").loc["off", "ip_similarity"])  # unscored until re-rendered

    flat = tmp_path / "flat"
    render(flat, layout="parquet")
    rows = [r for p in (flat / "parquet").glob("*.parquet") for r in pq.read_table(p, columns=["id", "json"]).to_pylist()]
    assert sorted(json.loads(r["json"]).get("ip_similarity") is not None for r in rows) == [True, True, True]
