"""Object storage for real: manifests, inputs, style prefixes and outputs on S3 (moto's server, a real HTTP
endpoint on loopback) and inputs over http://; resume by content, faults retried, credentials never shown.

The flow's S3 traffic goes through a FaultProxy in front of moto, which counts requests (what was fetched,
what was written) and injects failures where a test asks for them.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pandas as pd
import PIL.Image
import pytest
from pydantic import SecretStr
from s3 import Fault, FaultProxy, StaticServer

from ipaflow.tasks.metadata_scans import FOLDER_METADATA

STEPS = 2
ROOT = Path(__file__).resolve().parents[2]
INPUTS = ("diner", "bear", "gummy", "face")


@pytest.fixture
def proxy(moto):
    fronted = FaultProxy(moto.endpoint)
    yield fronted
    fronted.close()


@pytest.fixture
def aws_env(monkeypatch):
    """Credentials the standard way (environment); no endpoint or profile from the machine."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def bucket(moto, inputs_dir):
    """A fresh bucket with the inputs under in/ and a style prefix in/style/ (plus a file that is no image)."""
    name = moto.bucket(f"ipaflow-{uuid.uuid4().hex[:10]}")
    for stem in INPUTS:
        moto.put(name, f"in/{stem}.png", (inputs_dir / f"{stem}.png").read_bytes())
    for number in range(3):
        moto.put(name, f"in/style/img{number}.png", (inputs_dir / "style" / f"img{number}.png").read_bytes())
    moto.put(name, "in/style/README.txt", b"not an image")
    return name


@pytest.fixture
def render(models_env, prefect_api):
    from ipaflow.flows.render import render_manifest

    def run(manifest, out, options=None, **kwargs):
        secret = SecretStr(json.dumps(options)) if options else None
        return render_manifest(manifest, out=out, options={"storage_options": secret, **kwargs})

    return run


@pytest.fixture
def cli(models_env, prefect_api):
    """``ipaflow`` in this process. Prefect sets logging up when first imported: here, before the test's log
    capture starts, not in the middle of it."""
    import prefect.main  # noqa: F401

    from ipaflow.flows.cli import main

    return main


def upload_manifest(moto, bucket, rows, key="in/m.parquet") -> str:
    buffer = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buffer, index=False)
    moto.put(bucket, key, buffer.getvalue())
    return f"s3://{bucket}/{key}"


def metadata_parts(moto, bucket) -> list[str]:
    """The metadata dataset's files: the (empty) schema file first, then the parts."""
    keys = sorted(moto.objects(bucket, "out/metadata/"))
    assert keys and keys[0] == "out/metadata/00-schema.parquet", keys
    assert all(key.startswith("out/metadata/part-") for key in keys[1:]), keys
    return keys


def s3_records(moto, bucket) -> pd.DataFrame:
    """The records of s3://bucket/out, their outputs resolved under it (as ``ipaflow records`` shows them)."""
    from ipaflow.specs.outputs import resolve_output

    frames = [pd.read_parquet(io.BytesIO(moto.get(bucket, key)[0])) for key in metadata_parts(moto, bucket)]
    records = pd.concat(frames, ignore_index=True)
    records["outputs"] = [[resolve_output(f"s3://{bucket}/out", name) for name in names] for names in records["outputs"]]
    return records


def text_rows(bucket, n, image="diner"):
    return [
        {"id": f"r-{i}", "spec": "sdxl-text2img", "prompt": f"picture {i}",
         "ip_image": f"s3://{bucket}/in/{image}.png", "num_inference_steps": STEPS}
        for i in range(n)
    ]


def style_row(bucket):
    return {"id": "style-0", "spec": "sdxl-multi-style-face", "prompt": "a portrait",
            "style_folder": f"s3://{bucket}/in/style/", "ip_image": f"s3://{bucket}/in/face.png",
            "num_inference_steps": STEPS}


def assert_whole_outputs(moto, bucket, records):
    """Every ok record names outputs that exist, decode, and carry their parameters."""
    for record in records.itertuples():
        assert record.status == "ok", (record.id, record.error)
        for uri in record.outputs:
            data, content_type = moto.get(bucket, uri.removeprefix(f"s3://{bucket}/"))
            image = PIL.Image.open(io.BytesIO(data))
            image.load()
            assert image.size == (64, 64) and content_type == "image/png"
            assert json.loads(image.text["parameters"])["id"] == record.id


def image_objects(moto, bucket):
    """The images under out/images/ (less the dataset card's file) with their ETag, LastModified and size."""
    return {key: item for key, item in moto.objects(bucket, "out/images/").items()
            if not key.endswith(f"/{FOLDER_METADATA}")}


def image_puts(proxy, bucket):
    """Names of the images written through the proxy since its request log was last cleared."""
    return sorted(name for method, path in proxy.requests
                  if method == "PUT" and path.startswith(f"/{bucket}/out/images/")
                  and (name := path.rsplit("/", 1)[1]) != FOLDER_METADATA)


# -- the flow, s3:// and http:// to s3:// --------------------------------------------------------------------


def test_renders_from_s3_and_http_to_s3(moto, proxy, aws_env, bucket, inputs_dir, render):
    aws_env.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # the endpoint the standard way
    http = StaticServer(inputs_dir)
    try:
        rows = text_rows(bucket, 3)  # three rows share one input: fetched once
        rows[2]["num_images"] = 2
        rows.append({**rows[0], "id": "relative", "ip_image": "gummy.png"})  # relative to the manifest's folder
        rows.append({**rows[0], "id": "over-http", "ip_image": f"{http.url}/bear.png"})
        rows.append(style_row(bucket))
        manifest = upload_manifest(moto, bucket, rows)
        summary = render(manifest, f"s3://{bucket}/out/", batch_size=4)
    finally:
        http.close()
    assert (summary.rendered, summary.failed, summary.skipped) == (6, 0, 0), summary.failures
    assert proxy.count("GET", f"/{bucket}/in/diner.png") == 1

    records = s3_records(moto, bucket).set_index("id", drop=False)
    assert sorted(records.index) == sorted(row["id"] for row in rows)
    images = f"s3://{bucket}/out/images"
    assert list(records.loc["r-2", "outputs"]) == [f"{images}/r-2-0.png", f"{images}/r-2-1.png"]
    assert list(records.loc["style-0", "outputs"]) == [f"{images}/style-0.png"]
    assert_whole_outputs(moto, bucket, records)

    keys = set(moto.objects(bucket, "out/"))
    outputs = {uri.removeprefix(f"s3://{bucket}/") for uris in records["outputs"] for uri in uris}
    assert {key for key in keys if key.startswith("out/images/")} - {f"out/images/{FOLDER_METADATA}"} == outputs
    assert [key for key in keys if key.startswith("out/_ipaflow/")] == ["out/_ipaflow/lease-token.json"]  # the
    # journal was folded in and removed; the last lease's token stays, for the next run's to be higher
    assert moto.get(bucket, "out/index.html")[1].startswith("text/html")
    assert moto.get(bucket, metadata_parts(moto, bucket)[1])[1] == "application/vnd.apache.parquet"
    assert "images/over-http.png" in moto.get(bucket, "out/index.html")[0].decode()
    assert_previews_in_the_ui(moto, bucket, summary, specs=("sdxl-multi-style-face", "sdxl-text2img"), images=7)


def assert_previews_in_the_ui(moto, bucket, summary, specs, images):
    """Outputs in a bucket still show in the UI: the summary artifact embeds each spec's preview as a data: URI
    (the UI cannot load s3://), and the labelled contact sheet is written next to the outputs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["m-summary"])))
    [markdown] = [a.data for a in found if summary.run_id in a.data]
    previews = re.findall(r"!\[([^]]*)\]\(data:image/jpeg;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert [alt.replace("\\", "") for alt, _ in previews] == list(specs)
    for _, data in previews:
        assert PIL.Image.open(io.BytesIO(base64.b64decode(data))).format == "JPEG"
    sheet = PIL.Image.open(io.BytesIO(moto.get(bucket, "out/contact-sheet.png")[0]))
    assert sheet.size == (images * 128, 128 + 13)


# -- resume by content ---------------------------------------------------------------------------------------


def test_resume_on_s3_renders_only_what_changed(moto, proxy, aws_env, bucket, inputs_dir, render):
    options = {"client_kwargs": {"endpoint_url": proxy.endpoint}}  # flat form, given as --storage-options
    out = f"s3://{bucket}/out"
    rows = text_rows(bucket, 3) + [style_row(bucket)]
    manifest = upload_manifest(moto, bucket, rows)
    assert render(manifest, out, options).rendered == 4
    before = image_objects(moto, bucket)

    def run_and_puts(**kwargs):
        proxy.requests.clear()
        summary = render(upload_manifest(moto, bucket, rows), out, options, **kwargs)
        assert summary.failed == 0, summary.failures
        return summary, image_puts(proxy, bucket)

    again, puts = run_and_puts()
    assert (again.rendered, again.skipped, puts) == (0, 4, [])
    assert image_objects(moto, bucket) == before  # ETag and LastModified untouched

    rows[1]["prompt"] = "an edited prompt"  # an edited row, a new row, and a style prefix that grew
    rows.append({**rows[0], "id": "r-new"})
    moto.put(bucket, "in/style/img3.png", (inputs_dir / "style" / "img3.png").read_bytes())
    changed, puts = run_and_puts()
    assert (changed.rendered, changed.skipped, puts) == (3, 2, ["r-1.png", "r-new.png", "style-0.png"])

    everything, puts = run_and_puts(overwrite=True)
    assert everything.rendered == 5 and len(puts) == 5

    records = s3_records(moto, bucket)
    assert sorted(records["id"]) == sorted(row["id"] for row in rows)
    assert json.loads(records.set_index("id").loc["r-1", "params"])["prompt"] == "an edited prompt"
    assert len(metadata_parts(moto, bucket)) >= 2 and not moto.objects(bucket, "out/_ipaflow/journal/")


# -- faults ---------------------------------------------------------------------------------------------------


def test_endpoint_faults_mid_run_are_retried_and_lose_nothing(moto, proxy, aws_env, bucket, render):
    faults = [
        Fault("PUT", f"/{bucket}/out/images/", times=3, kinds=("503", "reset"), skip=1),
        Fault("GET", f"/{bucket}/in/diner.png", times=1, kinds=("truncate",)),
        Fault("HEAD", f"/{bucket}/in/", times=2, kinds=("503", "reset")),
        Fault("PUT", f"/{bucket}/out/_ipaflow/journal/", times=1, kinds=("503",)),
        Fault("GET", f"/{bucket}?list-type=2&prefix=out%2F_ipaflow", times=1, kinds=("reset",)),
        Fault("PUT", f"/{bucket}/out/metadata/part-", times=1, kinds=("reset",)),
    ]
    proxy.faults = faults
    rows = text_rows(bucket, 4) + text_rows(bucket, 4, image="bear")
    for number, row in enumerate(rows[4:]):
        row["id"] = f"b-{number}"
    manifest = upload_manifest(moto, bucket, rows)
    summary = render(manifest, f"s3://{bucket}/out", {"client_kwargs": {"endpoint_url": proxy.endpoint}})

    assert [f.failed for f in faults] == [f.times for f in faults]  # every fault was hit
    assert (summary.rendered, summary.failed) == (8, 0), summary.failures
    records = s3_records(moto, bucket)
    assert sorted(records["id"]) == sorted(row["id"] for row in rows)  # each exactly once
    assert_whole_outputs(moto, bucket, records)


def test_run_killed_after_journaling_resumes_without_rendering_again(moto, proxy, aws_env, bucket, render):
    """``ipaflow render`` in its own process, killed (SIGKILL) once its shard's records are journaled and
    before they are folded into metadata/: the next run folds them in and renders nothing again."""
    from prefect.settings import PREFECT_API_URL

    rows = text_rows(bucket, 6)
    manifest = upload_manifest(moto, bucket, rows)
    out = f"s3://{bucket}/out"
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint, "PREFECT_API_URL": PREFECT_API_URL.value()}
    process = subprocess.Popen([sys.executable, "-m", "ipaflow.flows.cli", "render", manifest, "--out", out], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    journal_written = threading.Event()

    def kill_after_journal(method: str, path: str) -> None:
        if journal_written.is_set():
            process.kill()
        elif method == "PUT" and f"/{bucket}/out/_ipaflow/journal/" in path and "/render-" in path:
            journal_written.set()

    proxy.on_request = kill_after_journal
    try:
        output = process.communicate(timeout=240)[0].decode(errors="replace")
    finally:
        process.kill()  # a no-op once it is gone; bounds a test that failed early
        process.wait()
    assert process.returncode == -signal.SIGKILL, output
    assert not moto.objects(bucket, "out/metadata/")
    journaled = set()  # usually all six (one flush at the shard's end), fewer if a timed flush came first
    for key in moto.objects(bucket, "out/_ipaflow/journal/"):
        journaled.update(pd.read_parquet(io.BytesIO(moto.get(bucket, key)[0]))["id"])
    assert journaled

    proxy.on_request = None
    proxy.requests.clear()
    resumed = render(manifest, out, {"client_kwargs": {"endpoint_url": proxy.endpoint}})
    assert (resumed.skipped, resumed.failed) == (len(journaled), 0)
    assert image_puts(proxy, bucket) == sorted(f"{row['id']}.png" for row in rows if row["id"] not in journaled)
    records = s3_records(moto, bucket)
    assert sorted(records["id"]) == sorted(row["id"] for row in rows)
    assert_whole_outputs(moto, bucket, records)


def test_storage_retries_when_the_sdk_gives_up(moto, proxy, bucket):
    """botocore retries a few times on its own; past that, ipaflow's retry goes on, within its bound."""
    from ipaflow.core.storage import Storage, TransientStorageError

    options = {"client_kwargs": {"endpoint_url": proxy.endpoint}, "key": "testing", "secret": "testing",
               "config_kwargs": {"retries": {"total_max_attempts": 1}}}
    storage = Storage(options=options, retries=3, backoff_s=0.01)
    proxy.faults = [Fault("PUT", "/x.png", times=3, kinds=("503",)), Fault("GET", "/x.png", times=2, kinds=("503",))]
    storage.write_atomic(f"s3://{bucket}/x.png", b"payload")
    assert storage.read_bytes(f"s3://{bucket}/x.png") == b"payload"
    assert (proxy.count("PUT", "/x.png"), proxy.count("GET", "/x.png")) == (4, 3)

    proxy.faults = [Fault("PUT", "/y.png", times=100, kinds=("503",))]
    with pytest.raises(TransientStorageError, match="still failing after 4 tries"):
        storage.write_atomic(f"s3://{bucket}/y.png", b"payload")
    assert proxy.count("PUT", "/y.png") == 4
    assert "y.png" not in moto.objects(bucket)


# -- storage details ------------------------------------------------------------------------------------------


def test_the_lease_on_an_s3_out(moto, aws_env, bucket):
    """No flock on an object store: the lease is created with a conditional PUT (If-None-Match), so of two
    runs taking it at once one wins; a second run is refused while the first holds it."""
    from ipaflow.core.lease import OutputInUse, OutputLease
    from ipaflow.core.storage import Storage

    aws_env.setenv("AWS_ENDPOINT_URL", moto.endpoint)
    storage = Storage()
    assert storage.create_exclusive(f"s3://{bucket}/x.json", b"first")
    assert not storage.create_exclusive(f"s3://{bucket}/x.json", b"second")
    assert moto.get(bucket, "x.json")[0] == b"first"
    with OutputLease(storage, f"s3://{bucket}/out", run="first"):
        with pytest.raises(OutputInUse, match=f"--out s3://{bucket}/out is in use by run first on "):
            OutputLease(storage, f"s3://{bucket}/out").acquire()
    assert "out/_ipaflow/lease.json" not in moto.objects(bucket)


def test_content_types_and_fresh_listings(moto, aws_env, bucket):
    from ipaflow.core.storage import Storage

    storage = Storage(options={"s3": {"client_kwargs": {"endpoint_url": moto.endpoint}}})
    expected = {"a.png": "image/png", "a.gif": "image/gif", "a.jpg": "image/jpeg", "a.webp": "image/webp",
                "index.html": "text/html; charset=utf-8", "m.parquet": "application/vnd.apache.parquet"}
    for name in expected:
        storage.write_atomic(f"s3://{bucket}/types/{name}", b"x")
    assert {name: moto.get(bucket, f"types/{name}")[1] for name in expected} == expected

    style = f"s3://{bucket}/in/style"
    first = storage.list_images(style)
    assert [uri.rsplit("/", 1)[1] for uri, _ in first] == ["img0.png", "img1.png", "img2.png"]
    moto.put(bucket, "in/style/img1.png", b"changed by someone else")  # behind this process's back
    moto.put(bucket, "in/style/img9.png", b"added")
    second = storage.list_images(style)
    assert len(second) == 4 and second[1][1] != first[1][1]
    assert storage.identity(f"{style}/img1.png") == second[1][1]  # one identity, whether listed or looked up


def test_file_uri_output_is_staged_inside_it(tmp_path, monkeypatch):
    from ipaflow.core.storage import Storage

    monkeypatch.chdir(tmp_path)
    out = f"file://{tmp_path}/out"
    Storage(local_staging=f"{out}/_ipaflow/tmp").write_atomic(f"{out}/images/a.png", b"whole")
    assert (tmp_path / "out" / "images" / "a.png").read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no stray "file:" folder
    assert list((tmp_path / "out" / "_ipaflow" / "tmp").iterdir()) == []


def test_storage_options_forms():
    from ipaflow.core.storage import Storage

    s3 = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}}
    timeouts = {"config_kwargs": {"connect_timeout": 10.0, "read_timeout": 30.0}}  # ipaflow's defaults (Timeouts)
    assert Storage(options=s3).options_for("s3") == {**s3, **timeouts}
    assert Storage(options=s3).options_for("https").keys() == {"client_kwargs"}  # flat kwargs would become request arguments
    assert Storage(options=s3).options_for("file") == {}
    both = Storage(options={"anon": False, "s3": s3, "http": {"headers": {"X-A": "1"}}})
    assert both.options_for("s3") == {"anon": False, **s3, **timeouts}
    assert both.options_for("s3a") == {"anon": False, **s3, **timeouts}
    assert both.options_for("https").keys() == {"headers", "client_kwargs"}
    assert both.options_for("https")["headers"] == {"X-A": "1"}


# -- credentials ----------------------------------------------------------------------------------------------

ENV_KEY, ENV_SECRET, ENV_TOKEN = "AKIAENVLEAKCHECK0001", "env-secret-Zq81xk2RwT", "env-token-Pp03Lw9Yt"
OPT_KEY, OPT_SECRET = "AKIAOPTLEAKCHECK0002", "opt-secret-Hc44mv7NsQ"
URL_PASSWORD = "url-password-Vb62Kd"
SECRETS = (ENV_KEY, ENV_SECRET, ENV_TOKEN, OPT_KEY, OPT_SECRET, URL_PASSWORD)


def _leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


def test_credentials_never_leak(moto, proxy, aws_env, bucket, inputs_dir, cli, caplog, capsys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )

    aws_env.setenv("AWS_ACCESS_KEY_ID", ENV_KEY)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    aws_env.setenv("AWS_SESSION_TOKEN", ENV_TOKEN)
    options = {"s3": {"key": OPT_KEY, "secret": OPT_SECRET, "client_kwargs": {"endpoint_url": proxy.endpoint},
                      "config_kwargs": {"retries": {"total_max_attempts": 1}}}}  # so that ipaflow's retry logs
    proxy.faults = [Fault("PUT", f"/{bucket}/out/images/", times=1, kinds=("503",))]
    http = StaticServer(inputs_dir)
    stem = f"leak-{uuid.uuid4().hex[:8]}"
    rows = text_rows(bucket, 2)
    rows.append({**rows[0], "id": "missing", "ip_image": f"s3://{bucket}/in/missing.png"})
    port = http.url.rsplit(":", 1)[1]
    rows.append({**rows[0], "id": "userinfo", "ip_image": f"http://ipaflow:{URL_PASSWORD}@127.0.0.1:{port}/nope.png"})
    manifest = upload_manifest(moto, bucket, rows, key=f"in/{stem}.parquet")
    api_loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    levels = [logger.level for logger in api_loggers]
    for logger in api_loggers:
        logger.setLevel(logging.INFO)  # the run's info lines reach the API too
    caplog.set_level(logging.INFO)
    try:
        code = cli(["render", manifest, "--out", f"s3://{bucket}/out", "--storage-options", json.dumps(options)])
    finally:
        http.close()
        for logger, level in zip(api_loggers, levels):
            logger.setLevel(level)
    printed = capsys.readouterr()

    assert code == 1  # two rows fail, with reasons
    records = s3_records(moto, bucket).set_index("id")
    assert records.loc["missing", "error"].startswith("ip_image: not found")
    assert "http://***@127.0.0.1" in records.loc["userinfo", "error"]
    assert "retrying" in caplog.text
    seen = {"stdout": printed.out + printed.err, "log records": caplog.text, "metadata": records.to_json()}
    for key in moto.objects(bucket, "out/"):  # outputs with their embedded parameters, index.html, metadata
        seen[key] = moto.get(bucket, key)[0].decode("latin-1")
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=stem)))[0]
        seen["parameters"] = json.dumps(run.parameters, default=str)
        for _ in range(50):  # the API records logs asynchronously
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            seen["prefect logs"] = "\n".join(log.message for log in logs)
            if "done:" in seen["prefect logs"]:
                break
            time.sleep(0.2)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        seen["artifacts"] = "\n".join(f"{a.data} {a.description}" for a in artifacts)
    assert "missing.png" in seen["artifacts"] and "done:" in seen["prefect logs"]  # where a leak would show
    assert {where: _leaks(text) for where, text in seen.items() if _leaks(text)} == {}


def test_records_keep_usable_output_uris_when_a_short_key_is_part_of_a_name(aws_env):
    """A credential that merely occurs in a bucket name must not turn outputs into URIs that do not exist."""
    from ipaflow.tasks.metadata_schema import make_record

    aws_env.setenv("AWS_ACCESS_KEY_ID", "renders")
    record = make_record(job_id="a", spec="s", status="ok", run_id="r", error="key renders rejected",
                         outputs=["s3://renders-2026/out/images/a.png", "https://user:pw@host/a.png"])
    assert record["outputs"] == ["images/a.png", "https://***@host/a.png"]  # a name relative to --out, or the URI
    assert record["error"] == "key *** rejected"


def test_container_layout_on_s3_resumes_and_keeps_one_sample_per_id(moto, proxy, aws_env, bucket, render):
    """A WebDataset layout on S3: tars published whole with the storage options, resume by key, and a
    re-rendered row's old sample rewritten out of the older tar."""
    import tarfile

    options = {"client_kwargs": {"endpoint_url": proxy.endpoint}}
    out = f"s3://{bucket}/out"
    rows = text_rows(bucket, 3)

    def keys() -> list[str]:
        found = []
        for key in moto.objects(bucket, "out/webdataset/"):
            with tarfile.open(fileobj=io.BytesIO(moto.get(bucket, key)[0])) as tar:
                found += [name for name in tar.getnames() if name.endswith(".png")]
        return sorted(found)

    first = render(upload_manifest(moto, bucket, rows), out, options, layout="webdataset")
    assert first.rendered == 3 and keys() == ["r-0.png", "r-1.png", "r-2.png"]
    assert not moto.objects(bucket, "out/images/")
    again = render(upload_manifest(moto, bucket, rows), out, options, layout="webdataset")
    assert (again.rendered, again.skipped) == (0, 3)
    rows[2]["prompt"] = "an edited prompt"
    edited = render(upload_manifest(moto, bucket, rows), out, options, layout="webdataset")
    assert (edited.rendered, edited.skipped) == (1, 2)
    assert keys() == ["r-0.png", "r-1.png", "r-2.png"]  # once each: the old r-2 left its tar
    records = s3_records(moto, bucket).set_index("id")
    assert len(records) == 3 and records.loc["r-2", "outputs"][0].startswith(f"s3://{bucket}/out/webdataset/")
    assert json.loads(records.loc["r-2", "params"])["prompt"] == "an edited prompt"
