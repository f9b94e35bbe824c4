"""Security: ids never address a path outside --out; specs are data (safe YAML, strict models); pickled weights
never run code; credentials never reach messages, metadata or artifacts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch


class _Payload:
    """Unpickling this creates a file: what a booby-trapped checkpoint would do with worse code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _zoo_with_trapped_weight(zoo: Path, root: Path, marker: Path) -> Path:
    """The zoo's repos linked under ``root``, h94/IP-Adapter copied, its SDXL adapter .bin replaced by a
    checkpoint whose pickle runs code."""
    for org in zoo.iterdir():
        if org.is_dir():
            (root / org.name).mkdir(parents=True)
            for repo in org.iterdir():
                (root / org.name / repo.name).symlink_to(repo)
    (root / "h94" / "IP-Adapter").unlink()
    shutil.copytree(zoo / "h94" / "IP-Adapter", root / "h94" / "IP-Adapter")
    weight = root / "h94" / "IP-Adapter" / "sdxl_models" / "ip-adapter_sdxl.bin"
    state = torch.load(weight, weights_only=True)
    state["image_proj"]["proj.weight"] = _Payload(marker)
    torch.save(state, weight)
    return weight


def test_pickled_adapter_weights_cannot_run_code(tmp_path, zoo_dir):
    from ipaflow.specs.registry import SpecRegistry
    from ipaflow.tasks.pipelines import build_pipeline

    marker = tmp_path / "pwned"
    weight = _zoo_with_trapped_weight(zoo_dir, tmp_path / "models", marker)
    with pytest.raises(Exception) as caught:
        build_pipeline(SpecRegistry().get("sdxl-text2img"), models_dir=str(tmp_path / "models"))
    assert not marker.exists()
    assert str(weight) in str(caught.value)  # says which file could not be loaded
    chain = []
    error: BaseException | None = caught.value
    while error is not None:
        chain.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    assert any("Weights only load failed" in text for text in chain), chain  # ... and why

    torch.load(weight, weights_only=False)  # the trap is live: an unsafe loader would have sprung it
    assert marker.exists()


SECRET_KEY, SECRET = "AKIAIPAFLOWTESTKEY", "ipaflow-test-secret-value"


def _rows_with_credentials(inputs_dir: Path) -> list[dict]:
    base = {"spec": "sdxl-text2img", "num_inference_steps": 1, "ip_image": str(inputs_dir / "bear.png")}
    return [
        {**base, "id": "userinfo", "ip_image": f"memory://{SECRET_KEY}:{SECRET}@bucket/x.png"},
        {**base, "id": "signed", "ip_image": f"{inputs_dir}/nope.png?X-Amz-Credential={SECRET_KEY}&X-Amz-Signature={SECRET}"},
        {**base, "id": "secret-in-path", "ip_image": f"{inputs_dir}/{SECRET}.png"},
        {**base, "id": "fine"},
    ]


def _storage_options() -> dict:
    return {"s3": {"key": SECRET_KEY, "secret": SECRET}}


def test_validate_messages_carry_no_credentials(tmp_path, inputs_dir):
    from pydantic import SecretStr
    from util import write_manifest

    from ipaflow.flows.validate import validate_manifest
    from ipaflow.specs.manifest import ManifestError, open_manifest
    from ipaflow.specs.options import RenderOptions

    manifest = write_manifest(tmp_path / "m.parquet", _rows_with_credentials(inputs_dir))
    options = RenderOptions(storage_options=SecretStr(json.dumps(_storage_options())))
    failed, _ = validate_manifest(str(manifest), options)
    assert [row.row for row in failed] == ["userinfo", "signed", "secret-in-path"]
    for line in (line for row in failed for line in row.lines()):
        assert SECRET not in line and SECRET_KEY not in line and "***" in line
    with pytest.raises(ManifestError) as caught:
        open_manifest(f"memory://{SECRET_KEY}:{SECRET}@bucket/m.parquet")
    assert SECRET not in str(caught.value) and "manifest not found" in str(caught.value)


def test_render_leaves_no_credentials_in_outputs_records_or_artifacts(tmp_path, inputs_dir, models_env, prefect_api):
    from prefect.client.orchestration import get_client
    from pydantic import SecretStr
    from util import read_records, write_manifest

    from ipaflow.flows.render import render_manifest

    manifest = write_manifest(tmp_path / "m.parquet", _rows_with_credentials(inputs_dir))
    summary = render_manifest(str(manifest), out=str(tmp_path / "out"),
                              options={"storage_options": SecretStr(json.dumps(_storage_options()))})
    assert (summary.rendered, summary.failed) == (1, 3)
    assert set(read_records(tmp_path / "out").set_index("id")["error"].dropna().str.contains(r"\*\*\*")) == {True}

    texts = [summary.model_dump_json()]
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode("latin-1"))  # metadata parquet, gallery, PNG chunks
    with get_client(sync_client=True) as client:
        texts.extend(json.dumps(a.model_dump(mode="json")) for a in client.read_artifacts())
        texts.extend(json.dumps(r.parameters, default=str) for r in client.read_flow_runs())
    for text in texts:
        assert SECRET not in text and SECRET_KEY not in text
    assert any("userinfo" in text for text in texts[1:])  # the records were searched, not nothing
