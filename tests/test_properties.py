"""Property-based: random manifests of valid and invalid values never crash validation or the flow; every row
ends ok, or failed with a reason that names a column."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import PIL.Image
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from specs.jobs import resolve_rows, row_label
from specs.manifest import KNOWN_COLUMNS
from specs.registry import SpecRegistry

REGISTRY = SpecRegistry()
SPECS = ["sdxl-text2img", "sdxl-img2img", "sdxl-inpaint", "animatediff-video", "sdxl-multi-style-face",
         "sd15-controlnet-depth", "lcm-instant", "nope", ""]
FILES = ["good.png", "missing.png", "corrupt.png", "empty.png", "style", "empty-dir", "[bad", "/abs/nope.png",
         "memory://user:pw@host/x.png"]

anything = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12),
    st.sampled_from(["nan", "3", "1e400", "\ud800", " 7 ", "[1, 2]"]), st.lists(st.integers(-2, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
ids = st.one_of(st.sampled_from(["a", "b", "row.1", "../up", "/abs", "con", "", ".h", "a/b", "a-0"]), anything)
files = st.one_of(st.sampled_from(FILES), st.lists(st.sampled_from(FILES), max_size=3), anything)
numbers = st.one_of(st.sampled_from([1, 2, 8, 64, 0.5, 1.0, -1, 0]), anything)


INPUT_COLUMNS = ("image", "mask", "control_image", "ip_image", "style_folder", "ip_mask")
NUMBER_COLUMNS = ("seed", "num_inference_steps", "guidance_scale", "strength", "width", "height", "num_frames",
                  "num_images", "controlnet_conditioning_scale", "ip_scale")
VALID = {"spec": "sdxl-text2img", "prompt": "a picture", "ip_image": "good.png", "num_inference_steps": 1}


@st.composite
def rows(draw, specs=st.one_of(st.sampled_from(SPECS), anything), numbers=numbers, max_rows=6):
    """Manifest rows: each either a valid row with up to two cells changed, or every column drawn from valid
    and invalid values; a missing cell is a null or no key at all."""
    strategies = {"spec": specs, "prompt": st.one_of(st.text(max_size=30), anything),
                  "negative_prompt": st.one_of(st.text(max_size=30), anything), "extra": anything,
                  **dict.fromkeys(INPUT_COLUMNS, files), **dict.fromkeys(NUMBER_COLUMNS, numbers)}
    out = []
    for _ in range(draw(st.integers(1, max_rows))):
        if draw(st.booleans()):
            row = {"id": draw(ids), **VALID}
            changed = draw(st.lists(st.sampled_from(sorted(strategies)), max_size=2))
        else:
            row = {"id": draw(ids)}
            changed = sorted(strategies)
        row.update({column: draw(strategies[column]) for column in changed})
        out.append({key: value for key, value in row.items()
                    if value is not None or key in ("id", "spec") or draw(st.booleans())})
    return out


@settings(max_examples=300, deadline=None)
@given(rows())
def test_resolving_random_rows_never_crashes(manifest):
    jobs, bad = resolve_rows(manifest, REGISTRY, "/base")
    assert sorted([job.index for job in jobs] + [index for index, _ in bad]) == list(range(len(manifest)))
    for index, problems in bad:
        assert problems
        for problem in problems:
            assert problem.row == row_label(manifest[index], index)
            assert problem.column in KNOWN_COLUMNS and problem.reason
            assert "\n" not in str(problem)
            str(problem).encode("utf-8")  # printable
    for job in jobs:
        json.dumps(job.params, allow_nan=False)
        assert job.id == str(manifest[job.index]["id"])


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory, inputs_dir) -> Path:
    """good.png, corrupt.png, empty.png, style/ (images), empty-dir/; missing.png does not exist."""
    root = tmp_path_factory.mktemp("property-inputs")
    good = (inputs_dir / "bear.png").read_bytes()
    (root / "good.png").write_bytes(good)
    (root / "corrupt.png").write_bytes(good[:100])
    (root / "empty.png").write_bytes(b"")
    (root / "style").mkdir()
    (root / "style" / "a.png").write_bytes(good)
    (root / "empty-dir").mkdir()
    return root


def _write_jsonl(folder: Path, manifest: list[dict]) -> Path:
    """A new manifest in ``folder``, so that the rows' relative input paths name the files there."""
    path = folder / f"m-{uuid.uuid4().hex}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in manifest))  # NaN and Infinity as Python writes them
    return path


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows())
def test_validating_random_manifests_never_crashes(files_dir, manifest):
    from flows.validate import validate_manifest

    problems, count = validate_manifest(str(_write_jsonl(files_dir, manifest)))
    assert count == len(manifest)
    assert all(p.column in KNOWN_COLUMNS and p.reason for p in problems)


# End to end: sdxl-text2img (the cheapest spec) or an unknown spec; never the spec's 100 steps, small sizes.
cheap_numbers = st.sampled_from([None, 1, 0, -1, 2.5, "ten", float("nan"), float("inf"), True, 64, 100, 2])
cheap = {
    "num_inference_steps": st.sampled_from([1, 1, 1, 0, -1, 2.5, "ten", float("nan"), True]),
    "width": st.sampled_from([None, None, None, 64, 100, 0, "x", float("nan")]),
    "height": st.sampled_from([None, None, None, 64, 100, 0, "x", float("nan")]),
    "num_images": st.sampled_from([None, None, None, 1, 2, 0, 100]),
}


@st.composite
def cheap_rows(draw):
    manifest = draw(rows(specs=st.sampled_from(["sdxl-text2img", "sdxl-text2img", "nope"]), numbers=cheap_numbers,
                         max_rows=3))
    for row in manifest:
        row.update({column: draw(strategy) for column, strategy in cheap.items()})
    return manifest


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cheap_rows())
@example([  # passthrough cells Parquet cannot hold as they are: an empty mapping, a huge integer, half a surrogate
    {"id": "ok", **VALID, "extra": {}, "big": 2**70},
    {"id": "ok-too", **VALID, "num_images": 2, "seed": "7", "extra": {}, "odd": "\ud800"},
    {"id": "bad", **VALID, "ip_image": "corrupt.png", "extra": {}},
])
def test_random_manifests_through_the_flow(files_dir, models_env, prefect_api, manifest):
    from flows.render import render_manifest

    path = _write_jsonl(files_dir, manifest)
    out = files_dir / f"out-{path.stem}"
    summary = render_manifest(str(path), out=str(out), batch_size=4)
    assert summary["rows"] == len(manifest)
    assert summary["rendered"] + summary["failed"] == len(manifest) and summary["skipped"] == 0
    assert all(f["error"] for f in summary["failures"])
    records = _records(out)
    failed_labels = {f["id"] for f in summary["failures"]}
    for index, row in enumerate(json.loads(line) for line in path.read_text().splitlines()):
        label = row_label(row, index)
        if label.startswith("#"):  # no id to key a record by: reported in the summary
            assert label in failed_labels
        elif records[label]["status"] == "ok":
            assert records[label]["error"] is None
            for uri in records[label]["outputs"]:
                PIL.Image.open(uri).load()
        else:
            assert records[label]["status"] == "failed" and records[label]["error"]


def _records(out: Path) -> dict[str, dict]:
    import pyarrow.parquet as pq

    if not (out / "metadata").exists():
        return {}
    return {record["id"]: record for record in pq.read_table(out / "metadata").to_pylist()}
