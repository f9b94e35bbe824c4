"""An output folder can move: records name outputs relative to ``--out``, so a folder moved on disk or a prefix
copied to another bucket is recognised as done (a re-run renders nothing); records written with absolute URIs
(before outputs were relative) still are, and their superseded outputs still leave the moved folder."""

from __future__ import annotations

import io
import json
import shutil
import uuid

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3 import client_env
from util import write_manifest

STEPS = 2


def _rows(inputs_dir, two_images: str = "a"):
    return [{"id": row_id, "spec": "sdxl-text2img", "prompt": f"picture {row_id}", "num_inference_steps": STEPS,
             "ip_image": str(inputs_dir / "diner.png"), "num_images": 2 if row_id == two_images else 1}
            for row_id in ("a", "b")]


@pytest.fixture
def render(models_env, prefect_api):
    from ipaflow.flows.render import render_manifest

    def run(manifest, out, **options):
        return render_manifest(str(manifest), out=str(out), options=options)

    return run


def _absolute_records(folder, old_root) -> None:
    """Rewrite every part as an older version wrote it: outputs as absolute URIs under ``old_root``."""
    for part in (folder / "metadata").glob("part-*.parquet"):
        table = pq.read_table(part)
        outputs = [[f"{old_root}/{name}" for name in names] for names in table.column("outputs").to_pylist()]
        pq.write_table(table.set_column(table.column_names.index("outputs"), "outputs",
                                        pa.array(outputs, pa.list_(pa.string()))), part)


def test_a_moved_folder_renders_nothing_again(tmp_path, inputs_dir, render, capsys):
    from ipaflow.flows.cli import main

    manifest = write_manifest(tmp_path / "m.parquet", _rows(inputs_dir))
    first = tmp_path / "first"
    assert render(manifest, first).rendered == 2
    names = sorted(name for names in pd.read_parquet(first / "metadata")["outputs"] for name in names)
    assert names == ["images/a-0.png", "images/a-1.png", "images/b.png"]
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(first, moved)
    again = render(manifest, moved)
    assert (again.rendered, again.skipped) == (0, 2)
    capsys.readouterr()
    assert main(["verify", str(moved)]) == 0
    assert main(["records", str(moved)]) == 0
    shown = {json.loads(line)["id"]: json.loads(line)["outputs"] for line in capsys.readouterr().out.splitlines()}
    assert shown == {"a": [f"{moved}/images/a-0.png", f"{moved}/images/a-1.png"], "b": [f"{moved}/images/b.png"]}

    _absolute_records(moved, first)  # as an older version wrote them, before the folder moved
    assert (render(manifest, moved).rendered, render(manifest, moved).skipped) == (0, 2)
    changed = write_manifest(tmp_path / "m2.parquet", _rows(inputs_dir, two_images="b"))
    assert render(changed, moved).rendered == 2
    assert sorted(p.name for p in (moved / "images").glob("*.png")) == ["a.png", "b-0.png", "b-1.png"]
    assert main(["verify", str(moved)]) == 0


def test_a_prefix_copied_to_another_bucket_renders_nothing_again(tmp_path, inputs_dir, render, moto, monkeypatch):
    from ipaflow.flows.cli import main

    for name, value in client_env(moto).items():
        monkeypatch.setenv(name, value)
    first, second = (moto.bucket(f"ipaflow-{uuid.uuid4().hex[:10]}") for _ in range(2))
    manifest = write_manifest(tmp_path / "m.parquet", _rows(inputs_dir))
    assert render(manifest, f"s3://{first}/run").rendered == 2
    for key in moto.objects(first, "run/"):  # every object, as `aws s3 sync` copies them
        moto.client.copy_object(Bucket=second, Key=key.replace("run/", "copied/", 1),
                                CopySource={"Bucket": first, "Key": key})
    again = render(manifest, f"s3://{second}/copied")
    assert (again.rendered, again.skipped) == (0, 2)
    assert main(["verify", f"s3://{second}/copied"]) == 0
    exported = tmp_path / "records.parquet"
    assert main(["records", f"s3://{second}/copied", "--output", str(exported)]) == 0
    outputs = sorted(uri for uris in pd.read_parquet(exported)["outputs"] for uri in uris)
    assert outputs == [f"s3://{second}/copied/images/{name}" for name in ("a-0.png", "a-1.png", "b.png")]
    raw = pd.read_parquet(io.BytesIO(moto.get(second, sorted(moto.objects(second, "copied/metadata/part-"))[0])[0]))
    assert all(name.startswith("images/") for names in raw["outputs"] for name in names)
