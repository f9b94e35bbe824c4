"""MP4 and WebM end to end: the bundled AnimateDiff spec with `output: {format: mp4}` or `{format: webm}` (user
specs) renders clips that decode with their frame count, fps and parameters; a re-run renders nothing; the
gallery plays them; the WebDataset layout carries `<id>.mp4` / `<id>.webm` and the Parquet layout a `video`
column, both loading with Hugging Face `datasets`."""

from __future__ import annotations

import json
import tarfile
from fractions import Fraction
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from util import read_records, write_manifest

from ipaflow.specs.registry import SpecRegistry
from ipaflow.tasks.video import read_video

FRAMES = 4
FORMATS = {"clip-mp4": ("mp4", 8, "h264"), "clip-webm": ("webm", 12, "vp9")}  # spec -> (format, fps, codec)


@pytest.fixture(scope="module")
def specs_dir(tmp_path_factory) -> Path:
    """The bundled animatediff-video spec, as user specs that write MP4 at 8 fps and WebM at 12 fps."""
    bundled = Path(SpecRegistry().source("animatediff-video")).read_text()
    assert "output: {format: gif, fps: 8}" in bundled
    folder = tmp_path_factory.mktemp("specs")
    for name, (fmt, fps, _) in FORMATS.items():
        text = bundled.replace("name: animatediff-video", f"name: {name}")
        (folder / f"{name}.yaml").write_text(text.replace("output: {format: gif, fps: 8}",
                                                          f"output: {{format: {fmt}, fps: {fps}}}"))
    return folder


@pytest.fixture
def render(models_env, prefect_api, specs_dir, inputs_dir, tmp_path):
    from ipaflow.flows.render import render_manifest

    rows = [{"id": f"wave-{fmt}", "spec": name, "prompt": "A cute gummy bear waving", "num_frames": FRAMES,
             "num_inference_steps": 2, "ip_image": str(inputs_dir / "gummy.png"), "seed": 1}
            for name, (fmt, _, _) in FORMATS.items()]
    manifest = write_manifest(tmp_path / "m.parquet", rows)

    def run(out, **options):
        summary = render_manifest(str(manifest), out=str(out),
                                  options={"batch_size": 2, "specs": [str(specs_dir)], **options})
        assert summary["failed"] == 0, summary["failures"]
        return summary

    return run


def _check_clip(data: bytes, spec: str) -> None:
    fmt, fps, codec = FORMATS[spec]
    info = read_video(data)
    assert (info.frames, info.fps, info.codec, (info.width, info.height)) == (FRAMES, Fraction(fps), codec, (64, 64))
    assert info.params["id"] == f"wave-{fmt}" and info.params["spec"] == spec and info.params["num_frames"] == FRAMES


def test_mp4_and_webm_files_decode_resume_and_play_in_the_gallery(tmp_path, render):
    out = tmp_path / "out"
    assert render(out)["rendered"] == 2
    for spec, (fmt, _, _) in FORMATS.items():
        _check_clip((out / "videos" / f"wave-{fmt}.{fmt}").read_bytes(), spec)
    records = read_records(out).set_index("id")
    assert records.loc["wave-mp4", "outputs"][0] == str(out / "videos" / "wave-mp4.mp4")
    page = (out / "index.html").read_text()
    assert "<video src='videos/wave-mp4.mp4'" in page and "<video src='videos/wave-webm.webm'" in page
    again = render(out)
    assert (again["rendered"], again["skipped"]) == (0, 2)


def test_webdataset_and_parquet_carry_the_clips_under_their_extension(tmp_path, render):
    from datasets import Video, load_dataset

    out = tmp_path / "out"
    render(out, layout="webdataset")
    members = {}
    for path in sorted((out / "webdataset").glob("*.tar")):
        with tarfile.open(path) as tar:
            members.update({name: tar.extractfile(name).read() for name in tar.getnames()})
    assert sorted(members) == ["wave-mp4.json", "wave-mp4.mp4", "wave-webm.json", "wave-webm.webm"]
    for spec, (fmt, _, _) in FORMATS.items():
        _check_clip(members[f"wave-{fmt}.{fmt}"], spec)
        assert json.loads(members[f"wave-{fmt}.json"])["spec"] == spec
    mp4_tar = [p for p in (out / "webdataset").glob("*.tar") if "wave-mp4.mp4" in tarfile.open(p).getnames()]
    dataset = load_dataset("webdataset", data_files={"train": [str(p) for p in mp4_tar]}, split="train",
                           cache_dir=str(tmp_path / "hf"))
    assert isinstance(dataset.features["mp4"], Video)  # datasets knows an .mp4 member for a video
    sample = dataset.cast_column("mp4", Video(decode=False))[0]  # decoding needs torchcodec, not installed here
    assert sample["__key__"] == "wave-mp4"
    _check_clip(sample["mp4"]["bytes"], "clip-mp4")

    render(out, layout="parquet")
    shards = sorted((out / "parquet").glob("*.parquet"))
    rows = [row for path in shards for row in pq.read_table(path).to_pylist()]
    assert sorted(row["video"]["path"] for row in rows) == ["wave-mp4.mp4", "wave-webm.webm"]
    for row in rows:
        _check_clip(row["video"]["bytes"], row["spec"])
    dataset = load_dataset("parquet", data_files={"train": [str(p) for p in shards]}, split="train",
                           cache_dir=str(tmp_path / "hf"))
    assert isinstance(dataset.features["video"], Video)
    clip = dataset.cast_column("video", Video(decode=False)).filter(lambda row: row["id"] == "wave-webm")[0]
    _check_clip(clip["video"]["bytes"], "clip-webm")
    assert {Path(uri.split("#")[0]).parent.name for uri in read_records(out)["outputs"].explode()} == {"parquet"}
