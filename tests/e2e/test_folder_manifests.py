"""A manifest that is a folder of Hive-partitioned files with relative inputs, rendered locally and from S3
(moto's server); adding a file renders only its rows; templated prompts render the filled text, a sweep every
combination; a re-run renders nothing."""

from __future__ import annotations

import io
import json
import shutil
import uuid

import pandas as pd
import PIL.Image
import pytest
from s3 import MotoS3
from util import read_records

from ipaflow.flows.cli import main

SWEPT = """name: swept
task: text2img
model: stabilityai/stable-diffusion-xl-base-1.0
ip_adapters:
  - {model: h94/IP-Adapter, subfolder: sdxl_models, weight_name: ip-adapter_sdxl.bin, scale: 0.6}
defaults: {prompt: "a photo of {object}"}
sweep: {guidance_scale: [1.5, 3.0]}
"""
ROW = {"spec": "sdxl-text2img", "ip_image": "bear.png", "num_inference_steps": 1, "width": 64, "height": 64}


def _part(folder, name, rows, inputs_dir):
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(inputs_dir / "bear.png", folder / "bear.png")  # relative to the file's own folder
    pd.DataFrame(rows).to_parquet(folder / name, index=False)


def test_folder_renders_and_a_new_file_renders_only_its_rows(tmp_path, models_env, prefect_api, inputs_dir, capsys):
    root = tmp_path / f"folder-{uuid.uuid4().hex[:8]}"
    _part(root / "date=2026-12-01", "part-0.parquet",
          [{**ROW, "id": "a", "object": "cat", "prompt": "a photo of {object}, {{flat}}"},
           {**ROW, "id": "b", "object": "dog", "prompt": "plain"}], inputs_dir)
    _part(root / "date=2026-12-02", "part-0.parquet",
          [{**ROW, "id": "c", "object": "owl"}, {**ROW, "id": "s", "object": "elk", "spec": "swept"}], inputs_dir)
    (root / "date=2026-12-01" / "_SUCCESS").write_text("")
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "swept.yaml").write_text(SWEPT)
    out = tmp_path / "out"

    assert main(["validate", str(root), "--specs", str(specs)]) == 0
    assert main(["render", str(root) + "/", "--out", str(out), "--specs", str(specs)]) == 0
    assert "5 rendered, 0 already done, 0 failed" in capsys.readouterr().out
    records = read_records(out).set_index("id")
    assert list(records["status"]) == ["ok"] * 5
    assert records["date"].to_dict() == {"a": "2026-12-01", "b": "2026-12-01", "c": "2026-12-02",
                                         "s.s0": "2026-12-02", "s.s1": "2026-12-02"}
    assert [json.loads(records.loc[i, "params"])["guidance_scale"] for i in ("s.s0", "s.s1")] == [1.5, 3.0]
    assert records.loc["s.s1", "params"] != records.loc["s.s0", "params"]
    assert json.loads(records.loc["a", "params"])["prompt"] == "a photo of cat, {flat}"
    assert records.loc["a", "prompt_template"] == "a photo of {object}, {{flat}}"
    image = PIL.Image.open(out / "images" / "a.png")
    assert json.loads(image.text["parameters"])["prompt"] == "a photo of cat, {flat}"

    _part(root / "date=2026-12-03", "part-0.parquet", [{**ROW, "id": "d", "object": "fox"}], inputs_dir)
    assert main(["render", str(root), "--out", str(out), "--specs", str(specs)]) == 0
    assert "1 rendered, 5 already done, 0 failed" in capsys.readouterr().out
    assert main(["render", str(root), "--out", str(out), "--specs", str(specs)]) == 0
    assert "0 rendered, 6 already done, 0 failed" in capsys.readouterr().out


@pytest.fixture
def moto_s3(monkeypatch):
    server = MotoS3()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    yield server
    server.close()


def test_folder_on_s3_validates_and_renders(moto_s3, models_env, prefect_api, inputs_dir, capsys):
    bucket = moto_s3.bucket(f"ipaflow-{uuid.uuid4().hex[:10]}")
    for date, ids in (("2026-12-01", ["a", "b"]), ("2026-12-02", ["c"])):
        buffer = io.BytesIO()
        pd.DataFrame([{**ROW, "id": i} for i in ids]).to_parquet(buffer, index=False)
        moto_s3.put(bucket, f"manifests/date={date}/part-0.parquet", buffer.getvalue())
        moto_s3.put(bucket, f"manifests/date={date}/bear.png", (inputs_dir / "bear.png").read_bytes())
    moto_s3.put(bucket, "manifests/_SUCCESS", b"")
    manifest = f"s3://{bucket}/manifests/"
    assert main(["validate", manifest]) == 0
    assert main(["render", manifest, "--out", f"s3://{bucket}/out/"]) == 0
    assert "3 rendered, 0 already done, 0 failed" in capsys.readouterr().out
    assert main(["render", f"s3://{bucket}/manifests/*/part-*.parquet", "--out", f"s3://{bucket}/out/"]) == 0
    assert "0 rendered, 3 already done, 0 failed" in capsys.readouterr().out
    assert main(["validate", f"s3://{bucket}/manifests/*/none-*.parquet"]) == 2
    assert "no file matches the pattern" in capsys.readouterr().err


def test_a_manifest_read_from_a_frozen_store_fails_within_the_call_deadline(monkeypatch):
    """moto frozen (SIGSTOP) mid-manifest: each request for the next manifest file is cut at
    IPAFLOW_CALL_TIMEOUT and counts toward the store's outage, as ipaflow's own files do."""
    import time

    from s3 import MotoProcess

    from ipaflow.core.deadlines import Timeouts
    from ipaflow.core.outages import StorageUnreachable
    from ipaflow.core.storage import Storage
    from ipaflow.specs.manifest import ManifestError, open_manifest

    server = MotoProcess()
    try:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(name, "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        server.client.create_bucket(Bucket="frozen")
        for number in range(2):
            buffer = io.BytesIO()
            pd.DataFrame([{**ROW, "id": f"r{number}"}]).to_parquet(buffer, index=False)
            server.client.put_object(Bucket="frozen", Key=f"m/part-{number}.parquet", Body=buffer.getvalue())
        storage = Storage(retries=1, backoff_s=0.05, timeouts=Timeouts(call=1.0, outage=1.0))
        batches = open_manifest("s3://frozen/m/", storage=storage).iter_batches()
        assert next(batches).num_rows == 1
        server.freeze()
        started = time.monotonic()
        with pytest.raises((ManifestError, StorageUnreachable), match="frozen"):  # cut, then the outage gives up
            next(batches)
        assert time.monotonic() - started < 10
    finally:
        server.close()
