"""Hostile inputs end to end, as a user meets them: ``ipaflow validate`` and ``ipaflow render`` run as processes
of their own on one manifest of hostile rows (a FIFO, a device, a folder, a 3 GiB file, a silent, a trickling
and an endless server, a refused connection, a decompression bomb, images too large for a row or an image
prompt, a style folder of 65 images) and good ones (one of them a large image listed eight ways, a 16-bit
depth map). Each bad row fails alone, with the same column and reason in both commands, within the time
limits set through the documented variables; each process peaks under 1.5 GB, read from the process."""

from __future__ import annotations

import json
import os

import PIL.Image
import pytest
from s3 import HostileServer, refused_url
from util import alias_bomb, header_only_png, ipaflow_command, read_records, run_measured

PEAK_LIMIT = int(1.5 * 1024**3)
TIMEOUTS = {"IPAFLOW_CONNECT_TIMEOUT": "0.5", "IPAFLOW_READ_TIMEOUT": "0.5", "IPAFLOW_INPUT_TIMEOUT": "2"}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, inputs_dir):
    root = tmp_path_factory.mktemp("hostile")
    server = HostileServer()
    os.mkfifo(root / "pipe.png")
    with open(root / "three-gib.png", "wb") as handle:
        handle.truncate(3 << 30)
    (root / "folder.png").mkdir()
    (root / "bomb.png").write_bytes(header_only_png(30000, 30000))
    (root / "huge.png").write_bytes(header_only_png(8191, 8191))
    (root / "prompt.png").write_bytes(header_only_png(4096, 4096))
    (root / "odd").mkdir()
    PIL.Image.new("L", (4096, 4096), 128).save(root / "odd" / "large.png")  # the largest image prompt there may be
    PIL.Image.new("I;16", (64, 64), 40000).save(root / "depth16.png")
    (root / "style65").mkdir()
    for number in range(65):
        PIL.Image.new("RGB", (8, 8), (number, 0, 0)).save(root / "style65" / f"{number:02d}.png")

    base = {"spec": "sdxl-text2img", "prompt": "p", "num_inference_steps": 1}
    large = ["odd/large.png", "./odd/large.png", "odd//large.png", "odd/../odd/large.png", f"{root}/odd/large.png",
             "./odd/./large.png", "odd/./large.png", "./odd//./large.png"]
    rows = {
        "good": str(inputs_dir / "diner.png"),
        "eight-ways": large,
        "depth16": "depth16.png",
        "fifo": "pipe.png",
        "zero": "/dev/zero",
        "folder": "folder.png",
        "huge-file": "three-gib.png",
        "silent": f"{server.url}/silent/x.png",
        "trickle": f"{server.url}/trickle/x.png",
        "endless": f"{server.url}/endless/x.png",
        "refused": f"{refused_url()}/x.png",
        "bomb": "bomb.png",
        "prompt-too-big": "huge.png",
    }
    manifest = [{**base, "id": row_id, "ip_image": value} for row_id, value in rows.items()]
    manifest.append({**base, "id": "row-budget", "spec": "sdxl-img2img", "image": "huge.png", "ip_image": "prompt.png",
                     "num_inference_steps": 2})  # 2 x strength 0.6: one denoising step
    manifest.append({**base, "id": "style-65", "spec": "sdxl-multi-style-face", "style_folder": "style65",
                     "ip_image": str(inputs_dir / "face.png")})
    (root / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in manifest))
    expected = {
        "fifo": ("ip_image", f"cannot read {root}/pipe.png: not a regular file (a FIFO)"),
        "zero": ("ip_image", "cannot read /dev/zero: not a regular file (a character device)"),
        "folder": ("ip_image", f"cannot read {root}/folder.png: is a folder, not a file"),
        "huge-file": ("ip_image", f"cannot read {root}/three-gib.png: too large: 3 GiB, more than the 256 MiB allowed"),
        "silent": ("ip_image", f"cannot read {rows['silent']}: no complete answer within 2 s ($IPAFLOW_INPUT_TIMEOUT)"),
        "trickle": ("ip_image", f"cannot read {rows['trickle']}: no complete answer within 2 s ($IPAFLOW_INPUT_TIMEOUT)"),
        "endless": ("ip_image", f"cannot read {rows['endless']}: too large: more than the 256 MiB allowed"),
        "refused": ("ip_image", f"cannot read {rows['refused']}: still failing after retries within 2 s "
                                "($IPAFLOW_INPUT_TIMEOUT): Connection refused"),
        "bomb": ("ip_image", f"{root}/bomb.png: too large: an image of 30000x30000 pixels, more than the 67108864 an "
                             "input may have"),
        "prompt-too-big": ("ip_image", f"{root}/huge.png: too large for an image prompt: an image of 8191x8191 pixels, "
                                       "more than the 16777216 an IP-Adapter image may have (its encoder sees it at "
                                       "224x224: downscale it)"),
        "row-budget": ("image", "too large: the row's images hold 83869697 pixels in all (image: 1 image(s) of "
                                "67092481 pixels, ip_image: 1 image(s) of 16777216 pixels), more than the 67108864 a "
                                "row may use"),
        "style-65": ("style_folder", f"{root}/style65 holds 65 images; at most 64 form one image prompt"),
    }
    yield root, expected
    server.close()


def _env(**extra) -> dict:
    return {**os.environ, **TIMEOUTS, **extra}


def test_validate_names_every_hostile_row_within_bounds(hostile):
    root, expected = hostile
    done, peak, seconds = run_measured([ipaflow_command(), "validate", str(root / "m.jsonl")], _env(), 300, root)
    assert done.returncode == 1, done.stderr
    found = {}
    for line in done.stdout.splitlines():
        row_id, column, reason = line.split(", ", 2)
        found[row_id] = (column, reason)
    assert found == expected
    assert "15 rows checked: 3 ok, 12 with problems" in done.stderr
    assert peak < PEAK_LIMIT, f"validate peaked at {peak / 2**20:.0f} MiB"
    assert seconds < 60, f"validate took {seconds:.0f} s"  # every time limit is 2 s; reads run side by side


def test_render_fails_the_same_rows_for_the_same_reasons_and_renders_the_rest(hostile, models_env, prefect_api):
    from prefect.settings import get_current_settings

    root, expected = hostile
    command = [ipaflow_command(), "render", str(root / "m.jsonl"), "--out", str(root / "out"), "--batch-size", "2"]
    done, peak, seconds = run_measured(command, _env(PREFECT_API_URL=str(get_current_settings().api.url)), 600, root)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "15 rows: 3 rendered, 0 already done, 12 failed" in done.stdout, done.stdout + done.stderr
    records = read_records(root / "out").set_index("id")
    assert set(records.index[records["status"] == "ok"]) == {"good", "eight-ways", "depth16"}
    failed = records[records["status"] == "failed"]
    assert {row_id: tuple(error.split(": ", 1)) for row_id, error in failed["error"].items()} == expected
    assert peak < PEAK_LIMIT, f"render peaked at {peak / 2**20:.0f} MiB"
    assert seconds < 240, f"render took {seconds:.0f} s"


def test_an_alias_bomb_spec_is_refused_at_once(tmp_path):
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "bomb.yaml").write_text(alias_bomb().replace("name: odd", "name: bomb"))
    for command in (["specs", "list"], ["specs", "show", "bomb"]):
        done, peak, seconds = run_measured([ipaflow_command(), *command, "--specs", str(tmp_path / "specs")],
                                           _env(), 60, tmp_path)
        assert done.returncode == 2 and done.stdout == ""  # nothing ran
        assert done.stderr.count("\n") == 1 and "bomb.yaml: not valid YAML (too large: " in done.stderr
        assert peak < 300 * 2**20 and seconds < 30


def test_out_as_the_style_folder_never_feeds_back(tmp_path, inputs_dir, models_env, prefect_api):
    """--out is also the style folder: the contact sheet and renders ipaflow writes there are not style images,
    so a second run finds the row done instead of rendering it again (and again)."""
    from util import write_manifest

    from ipaflow.flows.render import render_manifest

    out = tmp_path / "out"
    out.mkdir()
    for number in range(2):
        (out / f"style{number}.png").write_bytes((inputs_dir / "style" / f"img{number}.png").read_bytes())
    manifest = write_manifest(tmp_path / "m.parquet", [
        {"id": "styled", "spec": "sdxl-multi-style-face", "prompt": "p", "num_inference_steps": 1,
         "style_folder": str(out), "ip_image": str(inputs_dir / "face.png")}])
    first = render_manifest(str(manifest), out=str(out))
    assert (first.rendered, (out / "contact-sheet.png").exists()) == (1, True)
    second = render_manifest(str(manifest), out=str(out))
    assert (second.rendered, second.skipped, second.failed) == (0, 1, 0)
