"""The command line as a user meets it: specs, dry-run estimates, the demo."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from util import read_records, write_manifest

from ipaflow.flows.cli import main


def test_dry_run_estimates_without_writing(tmp_path, models_env, inputs_dir, capsys):
    rows = [{"id": f"r{i}", "spec": "sdxl-text2img", "prompt": "p", "ip_image": str(inputs_dir / "diner.png"),
             "num_inference_steps": 2} for i in range(6)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    assert main(["render", str(manifest), "--out", str(tmp_path / "out"), "--dry-run", "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("sdxl-text2img"))
    assert line.split()[1:3] == ["6", "8"]  # 6 rows; a warm-up batch and three timed batches of 2 (rows repeated)
    assert "estimated total" in printed and "spread" in printed
    assert not (tmp_path / "out").exists()


def test_dry_run_says_why_when_the_sample_fails(tmp_path, models_env, inputs_dir, capsys):
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "broken.yaml").write_text("name: broken\ntask: text2img\nmodel: nowhere/no-such-model\n"
                                       "ip_adapters: [{model: h94/IP-Adapter, subfolder: models, "
                                       "weight_name: ip-adapter_sd15.safetensors}]\n")
    rows = [{"id": f"r{i}", "spec": "broken", "prompt": "p", "ip_image": str(inputs_dir / "diner.png")} for i in range(3)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    code = main(["render", str(manifest), "--out", str(tmp_path / "out"), "--dry-run", "--specs", str(specs)])
    printed = capsys.readouterr().out
    assert code == 1
    assert "cannot estimate spec broken: pipeline: " in printed and "no estimate" in printed
    assert "estimated total" not in printed


def _estimate_lines(printed: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in printed.splitlines()
            if line.startswith(("sdxl-", "(invalid", "(already"))}


def test_dry_run_rejects_what_a_render_rejects(tmp_path, models_env, inputs_dir, capsys):
    """sdxl-inpaint leaves strength to its pipeline (0.9999): one step runs none, so a render fails the row
    while planning; the dry run rejects it too, and samples only the rows a render would render."""
    ip = str(inputs_dir / "diner.png")
    rows = [{"id": f"r{i}", "spec": "sdxl-text2img", "prompt": "p", "ip_image": ip, "num_inference_steps": 2}
            for i in range(2)]
    rows.append({"id": "inpaint-one-step", "spec": "sdxl-inpaint", "num_inference_steps": 1, "ip_image": ip,
                 "image": str(inputs_dir / "diner.png"), "mask": str(inputs_dir / "mask.png")})
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    assert main(["render", str(manifest), "--out", str(tmp_path / "out"), "--dry-run", "--batch-size", "1"]) == 0
    lines = _estimate_lines(capsys.readouterr().out)
    assert "sdxl-inpaint" not in lines
    assert lines["sdxl-text2img"][0] == "2" and lines["(invalid"][1] == "1"


def test_dry_run_estimates_the_rows_left_in_out(tmp_path, models_env, inputs_dir, prefect_api, capsys):
    """Rows already done in --out are counted as skipped, as a render would skip them."""
    rows = [{"id": f"r{i}", "spec": "sdxl-text2img", "prompt": "p", "ip_image": str(inputs_dir / "diner.png"),
             "num_inference_steps": 2} for i in range(5)]
    out = str(tmp_path / "out")
    assert main(["render", str(write_manifest(tmp_path / "first.parquet", rows[:3])), "--out", out]) == 0
    capsys.readouterr()
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    assert main(["render", str(manifest), "--out", out, "--dry-run", "--batch-size", "1"]) == 0
    lines = _estimate_lines(capsys.readouterr().out)
    assert lines["sdxl-text2img"][0] == "2" and lines["(already"][1] == "3" and lines["(invalid"][1] == "0"


def test_demo_renders_every_bundled_spec(tmp_path, models_env, prefect_api, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    records = read_records(tmp_path / "demo")
    specs = set(pd.read_parquet(tmp_path / "demo" / "manifest.parquet")["spec"])
    assert len(specs) == 9 and set(records["spec"]) == specs
    assert set(records["status"]) == {"ok"}
    assert (tmp_path / "demo" / "index.html").exists()
    assert (tmp_path / "demo" / "videos" / "gummy-video.gif").exists()
    assert "gallery" in capsys.readouterr().out
    # a second demo run finds everything done
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    assert "0 rendered, 11 already done" in capsys.readouterr().out


def _processes_with(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (Linux /proc; empty elsewhere)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            pass
    return found


def test_render_without_a_prefect_api_runs_its_own_and_leaves_none(tmp_path, models_env, inputs_dir):
    """What a new user runs: no PREFECT_API_URL anywhere. The command starts a temporary API server and the run
    is recorded there; no server outlives the command, whether it ends or is killed (SIGKILL, as the OOM
    killer does), and a re-run completes."""
    rows = [{"id": f"r{i}", "spec": "sdxl-text2img", "prompt": "p", "ip_image": str(inputs_dir / "diner.png"),
             "num_inference_steps": 2} for i in range(2)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    home = tmp_path / "prefect-home-of-this-test"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(home)
    command = [str(Path(sys.executable).with_name("ipaflow")), "render", str(manifest), "--out", str(tmp_path / "out")]

    killed = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not [pid for pid in _processes_with(f"PREFECT_HOME={home}") if pid != killed.pid]:
        assert killed.poll() is None and time.monotonic() < deadline, "no server process appeared"
        time.sleep(0.05)
    killed.kill()  # the command alone, not its process group
    killed.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _processes_with(f"PREFECT_HOME={home}"):
        assert time.monotonic() < deadline, "the temporary API server outlived a killed command"
        time.sleep(0.1)

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 rows: 2 rendered" in done.stdout
    assert set(read_records(tmp_path / "out")["status"]) == {"ok"}
    assert (home / "prefect.db").exists()  # the run went to the temporary server's database
    assert not _processes_with(f"PREFECT_HOME={home}"), "the temporary API server outlived the command"
