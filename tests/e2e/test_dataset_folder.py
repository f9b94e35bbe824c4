"""The output folder is exactly the dataset: after fewer images and a layout change, a listing of images/ and
the containers gives the current records' outputs and nothing else."""

from __future__ import annotations

import tarfile

from util import read_records, write_manifest


def test_fewer_images_then_another_layout_leave_exactly_the_current_outputs(tmp_path, inputs_dir, models_env,
                                                                             prefect_api):
    from ipaflow.flows.render import render_manifest

    out = tmp_path / "out"
    row = {"id": "a", "spec": "sdxl-text2img", "prompt": "a bear", "num_inference_steps": 1,
           "ip_image": str(inputs_dir / "bear.png"), "num_images": 2}

    def render(rows, **options):
        summary = render_manifest(str(write_manifest(tmp_path / "m.parquet", rows)), out=str(out),
                                  options={"batch_size": 2, **options})
        assert summary.failed == 0, summary.failures
        return summary

    render([row])
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a-0.png", "a-1.png", "metadata.parquet"]
    render([{**row, "num_images": 1}])
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a.png", "metadata.parquet"]  # and the card's
    assert read_records(out).set_index("id").loc["a", "outputs"] == [str(out / "images" / "a.png")]

    render([{**row, "num_images": 1}], layout="webdataset", overwrite=True)
    assert not list((out / "images").iterdir())
    tars = list((out / "webdataset").glob("*.tar"))
    assert len(tars) == 1 and tarfile.open(tars[0]).getnames() == ["a.png", "a.json"]


def test_a_torn_part_is_set_aside_and_nothing_renders_again(tmp_path, inputs_dir, models_env, prefect_api, caplog):
    import pandas as pd

    from ipaflow.flows.render import render_manifest

    out = tmp_path / "out"
    rows = [{"id": f"r{i}", "spec": "sdxl-text2img", "prompt": "a bear", "num_inference_steps": 1,
             "ip_image": str(inputs_dir / "bear.png"), "num_images": 1 + i % 2, "note": f"n{i}"} for i in range(3)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    assert render_manifest(str(manifest), out=str(out), options={"batch_size": 2}).rendered == 3
    before = read_records(out).set_index("id")[["key", "outputs", "params", "note"]]
    (part,) = (out / "metadata").glob("part-*.parquet")
    part.write_bytes(part.read_bytes()[:100])

    again = render_manifest(str(manifest), out=str(out), options={"batch_size": 2})
    assert (again.rendered, again.skipped, again.failed) == (0, 3, 0)
    assert (out / "_ipaflow" / "unreadable" / f"metadata--{part.name}").exists()
    after = read_records(out).set_index("id")[["key", "outputs", "params", "note"]]
    pd.testing.assert_frame_equal(after.sort_index(), before.sort_index())
