"""What reading inputs costs per row, without rendering: planning's identities (a content hash per local file)
and a shard worker's fetching (read, header probe, decode; windows of 2 x batch size with the next window
prefetched, as ``tasks/worker.py`` does), on local PNG image prompts.

    python benchmarks/input_overhead.py                    # 512 rows, 32 distinct 512x512 prompts, 5 repeats
    python benchmarks/input_overhead.py --size 64 --rows 2048

Prints the median of the repeats for each stage, in milliseconds per row. Only public API is used
(``identify_inputs``, ``InputFetcher``), so the same script measures any revision of ipaflow importable as
``ipaflow`` (put another checkout's package first on PYTHONPATH to compare).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--distinct", type=int, default=32, help="distinct image prompts, shared by the rows")
    parser.add_argument("--size", type=int, default=512, help="width and height of the prompts")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import numpy as np
    import PIL.Image

    import ipaflow.tasks.inputs as inputs
    from ipaflow.core.storage import Storage
    from ipaflow.specs.registry import SpecRegistry
    from ipaflow.specs.rows import resolve_rows
    from ipaflow.tasks.keys import identify_inputs

    folder = Path(tempfile.mkdtemp(prefix="ipaflow-input-overhead-"))
    rng = np.random.default_rng(0)
    for k in range(args.distinct):  # noise: PNGs that take real work to decode
        pixels = rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(folder / f"p{k}.png")
    registry = SpecRegistry()
    rows = [{"id": f"r{i}", "spec": "sdxl-text2img", "ip_image": str(folder / f"p{i % args.distinct}.png")}
            for i in range(args.rows)]
    jobs, bad = resolve_rows(rows, registry)
    assert not bad
    specs = {"sdxl-text2img": registry.get("sdxl-text2img")}

    def plan() -> None:
        identify_inputs(Storage(), jobs)

    def fetch() -> None:
        fetcher = inputs.InputFetcher(Storage(), jobs, specs)
        window = 2 * args.batch_size
        windows = [jobs[i:i + window] for i in range(0, len(jobs), window)]
        fetcher.prefetch(windows[0])
        for number, part in enumerate(windows):
            if number + 1 < len(windows):
                fetcher.prefetch(windows[number + 1])
            ready = [fetcher.get(job) for job in part]
            del ready
        fetcher.close()

    for name, stage in (("planning (identities)", plan), ("worker (read + decode)", fetch)):
        stage()  # warm the page cache and the imports
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            stage()
            times.append(time.perf_counter() - started)
        per_row = [1000 * t / args.rows for t in times]
        print(f"{name:24} {statistics.median(per_row):.3f} ms/row (median of {args.repeats}; "
              f"min {min(per_row):.3f}, max {max(per_row):.3f})")


if __name__ == "__main__":
    main()
