"""The issue's case end to end: a big manifest replaced (``mv``) by a small one once the run has started. The
swap is made deterministic by a hook in the command's process (right after the run's census), not by a sleep
race. The run stops in one line naming the file, exit status 2 (no row was judged): no traceback, no
``KeyError('sd15-full-face')``, nothing rendered against a census of another file."""

from __future__ import annotations

import os
import subprocess
import sys

from util import write_manifest

HOOK = """
import os, sys
import ipaflow.flows.open_run as open_run

taken = open_run.take_census

def census_then_swap(*args, **kwargs):
    census = taken(*args, **kwargs)
    os.replace(os.environ["SWAP_FROM"], os.environ["SWAP_TO"])  # mv small.parquet m.parquet
    return census

open_run.take_census = census_then_swap
from ipaflow.flows.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_manifest_replaced_after_the_census_stops_the_run_in_one_line(tmp_path, inputs_dir, models_env):
    rows = [{"id": f"bulk-{i:05d}", "spec": "sdxl-text2img", "prompt": f"p {i}", "num_inference_steps": 2,
             "ip_image": str(inputs_dir / "diner.png")} for i in range(2000)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    write_manifest(tmp_path / "small.parquet", [  # a spec the census never saw, and a duplicated id
        {"id": "bulk-00000", "spec": "sd15-full-face", "prompt": "new", "ip_image": str(inputs_dir / "face.png")},
        *[{**rows[2], "prompt": "twice"}] * 2])
    env = {**os.environ, "SWAP_FROM": str(tmp_path / "small.parquet"), "SWAP_TO": str(manifest),
           "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)  # its own temporary API server, as a user's command has
    done = subprocess.run([sys.executable, "-c", HOOK, "render", str(manifest), "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    said = done.stdout + done.stderr
    assert done.returncode == 2, said  # nothing ran: no row was judged against the census
    assert f"ipaflow: {manifest}: the manifest file changed while the run read it" in done.stderr
    assert "Traceback" not in said and "KeyError" not in said
    assert not list((tmp_path / "out").glob("images/*.png"))
