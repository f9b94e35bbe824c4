"""Nothing lost: `ipaflow render` killed with SIGKILL midway, then run again, ends with every row ok exactly
once, every output whole, and rows finished before the kill not rendered twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import PIL.Image
from util import output_names, read_records, write_manifest

ROWS = 24
# Outputs on disk when the render is killed: past the first shard of 4 rows (shards run one after another and a
# shard journals its records before the next starts), so some rows are recorded and some are not.
KILL_AT = 6


def _images(out: Path) -> list[Path]:
    folder = out / "images"
    return sorted(p for p in folder.iterdir() if p.suffix == ".png") if folder.exists() else []


def _start_render(manifest: Path, out: Path, logs: Path) -> subprocess.Popen:
    """`ipaflow render` in its own process group, on this session's Prefect API (no server of its own)."""
    from prefect.settings import get_current_settings

    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url)}
    command = [str(Path(sys.executable).with_name("ipaflow")), "render", str(manifest), "--out", str(out),
               "--batch-size", "2", "--shard-size", "4"]
    with open(logs, "wb") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_once_outputs_exist(process: subprocess.Popen, out: Path, logs: Path) -> int:
    deadline = time.monotonic() + 240
    while len(_images(out)) < KILL_AT:
        assert process.poll() is None, logs.read_text()[-3000:]
        assert time.monotonic() < deadline, "no outputs appeared"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the group this test started: the render and anything it spawned
    assert process.wait(timeout=30) == -signal.SIGKILL
    return len(_images(out))


def test_killed_render_resumes_without_loss_or_repeats(tmp_path, inputs_dir, models_env, prefect_api):
    from ipaflow.core.storage import Storage
    from ipaflow.flows.render import render_manifest
    from ipaflow.tasks.metadata import MetadataStore

    rows = [{"id": f"row-{i:02d}", "spec": "sdxl-text2img", "prompt": f"picture {i}",
             "ip_image": str(inputs_dir / ("bear.png", "diner.png")[i % 2]), "num_inference_steps": 2}
            for i in range(ROWS)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"

    process = _start_render(manifest, out, tmp_path / "render.log")
    on_disk = _kill_once_outputs_exist(process, out, tmp_path / "render.log")
    assert on_disk < ROWS, "the render finished before it could be killed"

    journaled = MetadataStore(Storage(), str(out)).load()  # what the killed run recorded (journal, not compacted)
    finished = {row_id for row_id, record in journaled.items() if record["status"] == "ok"}
    assert 4 <= len(finished) < ROWS
    before = {p.name: p.stat().st_mtime_ns for p in _images(out)}

    summary = render_manifest(str(manifest), out=str(out), options={"batch_size": 2, "shard_size": 4})
    assert (summary.failed, summary.skipped, summary.rendered) == (0, len(finished), ROWS - len(finished))
    for row_id in finished:  # rows recorded before the kill were not rendered again
        assert (out / "images" / f"{row_id}.png").stat().st_mtime_ns == before[f"{row_id}.png"]

    records = read_records(out)
    assert sorted(records["id"]) == [row["id"] for row in rows]  # one record per id
    assert set(records["status"]) == {"ok"}
    images = _images(out)
    assert [p.stem for p in images] == [row["id"] for row in rows]
    for path in images:  # whole, decodable files carrying their own id
        with PIL.Image.open(path) as image:
            image.load()
            assert image.size == (64, 64) and f'"id":"{path.stem}"' in image.text["parameters"]
    assert not [name for name in output_names(out / "images") if not name.endswith(".png")]
    parts = sorted(p.name for p in (out / "metadata").iterdir())  # the journal was folded into parts, and removed
    assert parts[0] == "00-schema.parquet" and all(name.startswith("part-") for name in parts[1:]), parts
    assert not list((out / "_ipaflow" / "journal").rglob("*.parquet"))
    assert not list(out.rglob("*.partial"))  # what the kill left half-written is cleaned up
