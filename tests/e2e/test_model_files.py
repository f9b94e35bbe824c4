"""A spec whose weights file cannot load fails its rows with a reason naming the file and saying why (truncated,
not a safetensors file, missing), and the console shows no traceback. Each case breaks one file of a copy of the
tiny zoo (hard links, the broken file replaced: the session's zoo stays whole)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from util import ipaflow_command, read_records, write_manifest

UNET = "stabilityai/stable-diffusion-xl-base-1.0/unet/diffusion_pytorch_model.safetensors"
ADAPTER = "h94/IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors"  # sdxl-multi-style-face's


def _broken_zoo(zoo: Path, root: Path, relative: str, how: str) -> Path:
    copy = root / "zoo"
    shutil.copytree(zoo, copy, copy_function=os.link, symlinks=True)
    target = copy / relative
    data = target.read_bytes()
    target.unlink()  # a hard link: replaced, never written through
    if how == "truncated":
        target.write_bytes(data[:len(data) // 2])
    elif how == "text":
        target.write_text("this is not a model\n")
    return copy


@pytest.mark.parametrize(("spec", "relative", "how", "said"), [
    ("sdxl-text2img", UNET, "text", "not a safetensors file"),
    ("sdxl-text2img", UNET, "missing", "missing"),
    ("sdxl-multi-style-face", ADAPTER, "missing", "missing"),
    ("sdxl-multi-style-face", ADAPTER, "truncated", "truncated"),
])
def test_the_build_error_names_the_file_and_why(tmp_path, models_env, spec, relative, how, said):
    from ipaflow.specs.registry import SpecRegistry
    from ipaflow.tasks.model_files import ModelFileError
    from ipaflow.tasks.pipelines import build_pipeline

    zoo = _broken_zoo(models_env, tmp_path, relative, how)
    with pytest.raises(ModelFileError) as caught:
        build_pipeline(SpecRegistry().get(spec), str(zoo))
    named = str(caught.value)
    assert named.startswith(str(zoo / relative.rsplit(".", 1)[0])) and f": {said}" in named, named


def test_a_truncated_weights_file_fails_its_rows_saying_so_without_a_traceback(tmp_path, models_env, inputs_dir):
    zoo = _broken_zoo(models_env, tmp_path, UNET, "truncated")
    manifest = write_manifest(tmp_path / "m.parquet", [
        {"id": f"r{i}", "spec": "sdxl-text2img", "prompt": "p", "ip_image": str(inputs_dir / "diner.png"),
         "num_inference_steps": 2} for i in range(2)])
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([ipaflow_command(), "render", str(manifest), "--out", str(tmp_path / "out"),
                           "--models", str(zoo)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    records = read_records(tmp_path / "out")
    reason = f"pipeline: {zoo / UNET}: truncated ("
    assert set(records["status"]) == {"failed"} and all(error.startswith(reason) for error in records["error"])
    assert f"failed: r0 (manifest row 0), {reason}" in done.stdout  # named as the artifacts name it
