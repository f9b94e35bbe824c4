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
from property_rows import INPUT_COLUMNS, REGISTRY, VALID, rows  # noqa: E402,F401

from ipaflow.specs.manifest import KNOWN_COLUMNS
from ipaflow.specs.rows import row_label


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
    from ipaflow.flows.validate import validate_manifest

    failed, count = validate_manifest(str(_write_jsonl(files_dir, manifest)))
    assert count == len(manifest)
    assert all(p.column in KNOWN_COLUMNS and p.reason for row in failed for p in row.problems)


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
    from ipaflow.flows.render import render_manifest

    path = _write_jsonl(files_dir, manifest)
    out = files_dir / f"out-{path.stem}"
    summary = render_manifest(str(path), out=str(out), options={"batch_size": 4})
    assert summary.rows == len(manifest)
    assert summary.rendered + summary.failed == len(manifest) and summary.skipped == 0
    assert all(f.error for f in summary.failures)
    records = _records(out)
    failed_labels = {f.id for f in summary.failures}
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
    from ipaflow.specs.outputs import resolve_outputs

    return {record["id"]: record for record in resolve_outputs(pq.read_table(out / "metadata"), str(out)).to_pylist()}
