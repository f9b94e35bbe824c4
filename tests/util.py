"""Small helpers shared by the tests."""

from __future__ import annotations

import struct
import subprocess
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas


@contextmanager
def mounted_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A small tmpfs of ``size`` (``2m``, ``256k``) mounted on ``folder`` for the block, to fill up: root may
    mount one; elsewhere the test is skipped."""
    import pytest

    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def output_names(folder: Path) -> list[str]:
    """The outputs in an output folder (``images/``, ``videos/``), by name: its files less the dataset card's
    ``metadata.parquet`` (the image folder builder's file, beside the outputs)."""
    from ipaflow.tasks.metadata_scans import FOLDER_METADATA

    return sorted(p.name for p in Path(folder).iterdir() if p.name != FOLDER_METADATA)


def write_manifest(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def read_records(out) -> pandas.DataFrame:
    """The records as ``pandas.read_parquet(out/metadata)`` reads them, their outputs (names relative to
    ``out``) resolved to URIs under it, as ``ipaflow records`` shows them."""
    import pandas as pd

    from ipaflow.specs.outputs import resolve_output

    records = pd.read_parquet(Path(out) / "metadata")
    records["outputs"] = [[resolve_output(str(out), name) for name in names] for names in records["outputs"]]
    return records


def header_only_png(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels: what a decompression bomb's header looks like, and
    proof that a check made on it read nothing more."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


_MEASURE = ("import resource, subprocess, sys\n"
            "code = subprocess.call(sys.argv[2:])\n"
            "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))\n"
            "sys.exit(code)\n")


def run_measured(command: list[str], env: dict, timeout: float, workdir: Path):
    """Run a command as a process of its own; (completed process, its peak resident memory in bytes, seconds).
    The peak is read from the process (getrusage of a launcher that runs only it), not estimated."""
    import subprocess
    import sys
    import time

    peak_file = workdir / f"peak-{time.monotonic_ns()}"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(peak_file), *command], env=env, capture_output=True,
                          text=True, timeout=timeout)
    return done, int(peak_file.read_text()), time.monotonic() - started


def ipaflow_command() -> str:
    """The installed console script next to this interpreter."""
    import sys

    return str(Path(sys.executable).with_name("ipaflow"))


def slow_manifest(path: Path, inputs_dir: Path, rows: int = 40) -> Path:
    """A manifest of ``rows`` rows of 8 steps each: a render of it is still going when a test stops it."""
    return write_manifest(path, [{"id": f"r{i:02d}", "spec": "sdxl-text2img", "prompt": f"p{i}",
                                  "ip_image": str(inputs_dir / "diner.png"), "num_inference_steps": 8}
                                 for i in range(rows)])


def start_until_first_image(args: list[str], env: dict, out: Path, timeout: float = 240):
    """``ipaflow <args>`` started in a session of its own (a terminal's Ctrl-C reaches its whole process group),
    returned once its first image is in ``out``: the process (``Popen``)."""
    import subprocess
    import time

    process = subprocess.Popen([ipaflow_command(), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not (out / "images").is_dir() or not any((out / "images").iterdir()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    return process


SPEC_HEAD = "name: odd\ntask: text2img\nmodel: a/b\n"


def alias_bomb() -> str:
    """The issue's case: nine levels of nine aliases (9**9 = 387 million numbers) in an IP-Adapter's scale."""
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for level in range(1, 9):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    bomb = "\n".join(f"  {line}" for line in lines)
    return SPEC_HEAD + f"x-anchors:\n{bomb}\nip_adapters: [{{model: h94/IP-Adapter, weight_name: a.bin, scale: {{up: *a8}}}}]\n"


def write_folder(out, layout: str, rows=(("a", 1), ("b", 2), ("c.d", 1)), run: str = "r1", scores=None):
    """An output folder as a run leaves it, without a model: rows (id, images) written by a shard writer in
    ``layout`` (8x8 images, passthrough column ``note``; ``scores``: id -> its outputs' ip_similarities), then
    folded. Returns its ``MetadataStore``."""
    import numpy as np
    import PIL.Image

    from ipaflow.core.storage import Storage
    from ipaflow.specs.registry import SpecRegistry
    from ipaflow.specs.rows import Job
    from ipaflow.tasks.metadata import MetadataStore
    from ipaflow.tasks.render import Rendered
    from ipaflow.tasks.writers import ShardWriter

    spec = SpecRegistry().get("sdxl-text2img")
    writer = ShardWriter(Storage(), str(out), run, "s0", spec, {row_id: f"k-{row_id}" for row_id, _ in rows},
                         layout=layout)
    for number, (row_id, count) in enumerate(rows):
        job = Job(id=row_id, spec=spec.name, index=number, seed=number, params={"prompt": f"p {row_id}",
                  "num_images": count}, inputs={}, extra={"note": f"n-{row_id}"})
        images = [PIL.Image.fromarray(np.full((8, 8, 3), 40 * number + k, np.uint8)) for k in range(count)]
        writer.submit(Rendered(job=job, images=images, similarities=(scores or {}).get(row_id)))
    writer.close()
    store = MetadataStore(Storage(), str(out))
    store.fold(run)
    return store


def artifact_role(artifact) -> str:
    """Which of a run's artifacts this is, from its key: progress, failed-rows, summary or contact-sheet."""
    for role in ("failed-rows", "contact-sheet"):
        if artifact.key.endswith(f"-{role}"):
            return role
    return artifact.key.rsplit("-", 1)[-1]


def markdown_table(markdown: str) -> list[dict]:
    """The rows of the first markdown table in ``markdown``, cells as written (escaped), by header."""
    import re

    lines = [line.strip() for line in markdown.splitlines() if line.strip().startswith("|")]
    split = [re.split(r"(?<!\\) \| ", line[2:-2]) for line in lines]
    return [dict(zip(split[0], cells)) for cells in split[2:]]


def load_script(relative: str):
    """A script of the repository (``benchmarks/eta.py``, ``scripts/ui_check.py``) as a module, for its tests."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(f"ipaflow_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
