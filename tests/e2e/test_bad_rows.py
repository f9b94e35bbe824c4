"""Bad input never crashes a run: one manifest mixing good rows with every kind of bad row, checked by
`ipaflow validate` (the real CLI) and rendered by the flow; plus --max-failures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
from util import output_names, read_records

TEXT2IMG = {"spec": "sdxl-text2img", "ip_image": "inputs/bear.png", "num_inference_steps": 1}
IMG2IMG = {**TEXT2IMG, "spec": "sdxl-img2img", "image": "inputs/bear.png"}
MULTI = {**TEXT2IMG, "spec": "sdxl-multi-style-face", "ip_image": "inputs/face.png", "style_folder": "inputs/style"}
LONG_PROMPT = ("a long prompt, " * 134)[:2000]

GOOD_ROWS = [
    {**TEXT2IMG, "id": "good-unicode", "prompt": "ünïcödé 日本語 🎨 «quotes», \"double\", commas, new\nline"},
    {**TEXT2IMG, "id": "good-long", "prompt": LONG_PROMPT},
    {**TEXT2IMG, "id": "good.relative_path-1", "prompt": "relative input", "note": "carried through"},
    {**TEXT2IMG, "id": 7, "prompt": "an integer id", "seed": 42},
    {**TEXT2IMG, "id": "good-two", "prompt": "two images", "num_images": 2, "strength": float("nan")},
]
GOOD_IDS = ["good-unicode", "good-long", "good.relative_path-1", "7", "good-two"]

# (row, label the problems are printed under, {column: words in the reason}).
BAD_ROWS = [
    ({**TEXT2IMG, "id": None}, "#", {"id": "required"}),
    ({**TEXT2IMG, "id": "../escape"}, "#", {"id": "must match"}),
    ({**TEXT2IMG, "id": "/tmp/absolute"}, "#", {"id": "must match"}),
    ({**TEXT2IMG, "id": "sub/dir"}, "#", {"id": "must match"}),
    ({**TEXT2IMG, "id": "back\\slash"}, "#", {"id": "must match"}),
    ({**TEXT2IMG, "id": "CON"}, "#", {"id": "reserved file name"}),
    ({**TEXT2IMG, "id": ".hidden"}, "#", {"id": "must match"}),
    ({**TEXT2IMG, "id": "x" * 129}, "#", {"id": "must match"}),
    ({**TEXT2IMG, "id": "dup"}, "dup", {"id": "duplicate id"}),
    ({**TEXT2IMG, "id": "dup"}, "dup", {"id": "duplicate id"}),
    ({**TEXT2IMG, "id": "collide", "num_images": 2}, "collide", {"id": "also written by"}),
    ({**TEXT2IMG, "id": "collide-1"}, "collide-1", {"id": "also written by"}),
    ({**TEXT2IMG, "id": "no-spec", "spec": None}, "no-spec", {"spec": "required"}),
    ({**TEXT2IMG, "id": "unknown-spec", "spec": "nope"}, "unknown-spec", {"spec": "unknown spec 'nope'"}),
    ({**TEXT2IMG, "id": "steps-zero", "num_inference_steps": 0}, "steps-zero", {"num_inference_steps": ">= 1"}),
    ({**TEXT2IMG, "id": "steps-text", "num_inference_steps": "ten"}, "steps-text",
     {"num_inference_steps": "must be an integer, got 'ten'"}),
    ({**TEXT2IMG, "id": "steps-frac", "num_inference_steps": 2.5}, "steps-frac",
     {"num_inference_steps": "must be an integer"}),
    ({**TEXT2IMG, "id": "guidance-nan", "guidance_scale": float("nan")}, "guidance-nan", {"guidance_scale": "finite"}),
    ({**TEXT2IMG, "id": "guidance-inf", "guidance_scale": float("inf")}, "guidance-inf", {"guidance_scale": "finite"}),
    ({**TEXT2IMG, "id": "width-odd", "width": 100}, "width-odd", {"width": "multiple of 8"}),
    ({**TEXT2IMG, "id": "size-negative", "height": -64, "width": 0}, "size-negative",
     {"height": ">= 8", "width": ">= 8"}),
    ({**TEXT2IMG, "id": "images-zero", "num_images": 0}, "images-zero", {"num_images": ">= 1"}),
    ({**TEXT2IMG, "id": "prompt-number", "prompt": 42}, "prompt-number", {"prompt": "must be a string"}),
    ({**TEXT2IMG, "id": "seed-negative", "seed": -1}, "seed-negative", {"seed": "must lie in"}),
    ({**TEXT2IMG, "id": "seed-text", "seed": "abc"}, "seed-text", {"seed": "must be an integer"}),
    ({**IMG2IMG, "id": "strength-zero", "strength": 0}, "strength-zero", {"strength": "> 0"}),
    ({**IMG2IMG, "id": "strength-big", "strength": 1.5}, "strength-big", {"strength": "<= 1"}),
    ({**IMG2IMG, "id": "img2img-width", "width": 64}, "img2img-width", {"width": "resize the input"}),
    ({**TEXT2IMG, "id": "img2img-no-image", "spec": "sdxl-img2img"}, "img2img-no-image",
     {"image": "required by spec 'sdxl-img2img'"}),
    ({**TEXT2IMG, "id": "inpaint-bare", "spec": "sdxl-inpaint"}, "inpaint-bare",
     {"image": "required", "mask": "required"}),
    ({**TEXT2IMG, "id": "controlnet-bare", "spec": "sd15-controlnet-depth"}, "controlnet-bare",
     {"control_image": "required"}),
    ({**TEXT2IMG, "id": "frames-zero", "spec": "animatediff-video", "num_frames": 0}, "frames-zero",
     {"num_frames": ">= 1"}),
    ({**TEXT2IMG, "id": "video-two", "spec": "animatediff-video", "num_images": 2}, "video-two",
     {"num_images": "one video per row"}),
    ({**MULTI, "id": "multi-no-style", "style_folder": None}, "multi-no-style",
     {"style_folder": "IP-Adapter 1"}),
    ({**MULTI, "id": "multi-one-scale", "ip_scale": [0.5]}, "multi-one-scale", {"ip_scale": "1 values for 2"}),
    ({**TEXT2IMG, "id": "scale-count", "ip_scale": [0.5, 0.5]}, "scale-count", {"ip_scale": "2 values for 1"}),
    ({**TEXT2IMG, "id": "no-ip-image", "ip_image": None}, "no-ip-image", {"ip_image": "required"}),
    ({**TEXT2IMG, "id": "bad-json-list", "ip_image": "[inputs/bear.png"}, "bad-json-list",
     {"ip_image": "does not parse"}),
    ({**TEXT2IMG, "id": "mask-count", "ip_mask": ["inputs/mask.png", "inputs/mask.png"]}, "mask-count",
     {"ip_mask": "one mask per ip_image"}),
    # Inputs: found only by reading them (validate) or at render time (render).
    ({**TEXT2IMG, "id": "missing-file", "ip_image": "inputs/nope.png"}, "missing-file", {"ip_image": "not found"}),
    ({**TEXT2IMG, "id": "corrupt-file", "ip_image": "inputs/corrupt.png"}, "corrupt-file",
     {"ip_image": "corrupt image"}),
    ({**TEXT2IMG, "id": "empty-file", "ip_image": "inputs/empty.png"}, "empty-file", {"ip_image": "empty file"}),
    ({**TEXT2IMG, "id": "text-file", "ip_image": "inputs/notes.png"}, "text-file",
     {"ip_image": "not a decodable image"}),
    ({**MULTI, "id": "style-empty", "style_folder": "inputs/empty-style"}, "style-empty",
     {"style_folder": "no images in"}),
    ({**MULTI, "id": "style-missing", "style_folder": "inputs/no-such-folder"}, "style-missing",
     {"style_folder": "not found"}),
    ({**TEXT2IMG, "id": "inpaint-missing-mask", "spec": "sdxl-inpaint", "image": "inputs/bear.png",
      "mask": "inputs/no-mask.png", "num_inference_steps": 2}, "inpaint-missing-mask", {"mask": "not found"}),
]
READABLE = {">= 1": "greater than or equal to 1", ">= 8": "greater than or equal to 8", "> 0": "greater than 0",
            "<= 1": "less than or equal to 1"}


def _words(text: str) -> str:
    return READABLE.get(text, text)


def write_mixed_manifest(folder: Path, inputs_dir: Path) -> Path:
    """The manifest (JSON Lines: a column may change type from row to row) and its inputs, under ``folder``."""
    inputs = folder / "inputs"
    shutil.copytree(inputs_dir, inputs)
    png = (inputs / "bear.png").read_bytes()
    (inputs / "corrupt.png").write_bytes(png[: len(png) // 2])
    (inputs / "empty.png").write_bytes(b"")
    (inputs / "notes.png").write_text("not an image at all\n")
    (inputs / "empty-style").mkdir()
    (inputs / "empty-style" / "readme.txt").write_text("no images here")
    rows = []
    for row in GOOD_ROWS[:3] + [row for row, _, _ in BAD_ROWS] + GOOD_ROWS[3:]:
        rows.append({key: value for key, value in row.items() if value is not None or key == "id"})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))  # NaN and Infinity as Python writes them
    return manifest


def expected_problems(manifest: Path) -> dict[str, dict[str, str]]:
    """Label -> column -> words of the reason; rows with an invalid id are labelled by their index."""
    lines = manifest.read_text().splitlines()
    expected: dict[str, dict[str, str]] = {}
    for row, label, problems in BAD_ROWS:
        if label == "#":
            line = json.dumps({k: v for k, v in row.items() if v is not None or k == "id"})
            label = f"#{lines.index(line)}"
        expected.setdefault(label, {}).update({column: _words(words) for column, words in problems.items()})
    return expected


def _parse(lines: list[str]) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for line in lines:
        label, column, reason = line.split(", ", 2)
        found.setdefault(label, {})[column] = reason
    return found


@pytest.fixture
def mixed(tmp_path, inputs_dir):
    return write_mixed_manifest(tmp_path / "job", inputs_dir)


def test_validate_cli_names_each_bad_row_and_column(mixed, tmp_path):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    ipaflow = Path(sys.executable).with_name("ipaflow")
    done = subprocess.run([str(ipaflow), "validate", str(mixed)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    found = _parse(lines)
    expected = expected_problems(mixed)
    assert set(found) == set(expected), (sorted(set(found) ^ set(expected)), done.stdout)
    for label, columns in expected.items():
        for column, words in columns.items():
            assert column in found[label], (label, column, found[label])
            assert words in found[label][column], (label, column, found[label][column])
    assert not set(GOOD_IDS) & set(found)
    assert f"{len(GOOD_ROWS) + len(BAD_ROWS)} rows checked" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def _snapshot(folder: Path, skip: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")
            if p.is_file() and skip not in p.parents}


def test_render_renders_good_rows_and_records_bad_ones(mixed, models_env, prefect_api):
    from ipaflow.flows.render import render_manifest
    from ipaflow.flows.validate import validate_manifest

    folder = mixed.parent
    out = folder / "out"
    parent_before = _snapshot(folder.parent, out)
    summary = render_manifest(str(mixed), out=str(out), options={"batch_size": 4})
    assert _snapshot(folder.parent, out) == parent_before  # nothing written outside --out

    rows = len(GOOD_ROWS) + len(BAD_ROWS)
    assert (summary.rows, summary.rendered, summary.failed) == (rows, len(GOOD_IDS), len(BAD_ROWS))
    records = read_records(out).set_index("id")
    ok = records[records["status"] == "ok"]
    assert sorted(ok.index) == sorted(GOOD_IDS) and ok["error"].isna().all()
    for outputs in ok["outputs"]:
        for uri in outputs:
            assert Path(uri).parent == out / "images"
            PIL.Image.open(uri).load()
    assert len(records.loc["good-two", "outputs"]) == 2
    assert records.loc["good.relative_path-1", "note"] == "carried through"
    assert json.loads(records.loc["good-long", "params"])["prompt"] == LONG_PROMPT
    assert json.loads(records.loc["good-unicode", "params"])["prompt"].startswith("ünïcödé 日本語 🎨")
    assert output_names(out / "images") == sorted(
        ["good-unicode.png", "good-long.png", "good.relative_path-1.png", "7.png", "good-two-0.png", "good-two-1.png"])

    # Every bad row failed with the reasons validate gives, the column named; invalid ids have no record.
    failed, _ = validate_manifest(str(mixed))
    failures = {f.id: f.error for f in summary.failures}
    for row in failed:
        for problem in row.problems:
            reason = str(problem)
            assert reason in failures[row.row], (problem, failures[row.row])
            if not row.row.startswith("#"):
                assert records.loc[row.row, "status"] == "failed"
                assert reason in records.loc[row.row, "error"]
    assert not any(label.startswith("#") for label in records.index)
    assert len(records) == rows - sum(1 for _, label, _ in BAD_ROWS if label == "#") - 1  # "dup" once


def test_max_failures_stops_early_with_nonzero_exit(tmp_path, inputs_dir, models_env, prefect_api):
    from ipaflow.flows.cli import main

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # exists (passes the up-front check), cannot decode
    rows = [{**TEXT2IMG, "id": f"row-{i}", "ip_image": str(bad)} for i in range(10)]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    code = main(["render", str(manifest), "--out", str(out), "--shard-size", "1", "--max-failures", "2"])
    assert code == 1
    errors = read_records(out).set_index("id")["error"]
    assert len(errors) == 10 and errors.notna().all()
    attempted = errors[errors.str.startswith("ip_image:")]
    assert 2 <= len(attempted) < 10  # the rest never reached a worker
    assert all("not rendered: the run stopped early" in e for e in errors.drop(attempted.index))
