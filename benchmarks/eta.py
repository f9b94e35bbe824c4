"""How close the run's ETA (``ipaflow.flows.progress.ProgressEstimator``) is to the time that actually remained,
on synthetic runs: batches that end as the workers finish them, a clock of their own, no models.

    python benchmarks/eta.py [--rows 2000] [--seeds 5]
    python benchmarks/eta.py --render 160 [--steps 4]

Each run: ``--rows`` rows in batches, taken in turn by the workers (each loads its pipeline first, 5-10 s), every
batch's time +/-20% at random. Three speeds: steady (2 rows/s), halving at 50% of the rows (2 then 1 rows/s) and
doubling there (1 then 2 rows/s); three shapes of run (1 worker with batches of 8, 4 with 16, 8 with 4). The
estimator is fed every batch as it ends and read every second, as the flow does; the error is (ETA - time that
remained) / time that remained, from 20% to 90% of the rows done. In the last few batches the rows in flight
(counted when their batch ends) are a large share of what remains: the ETA is long by about half a batch's time
there, which is many percent of a few seconds.

Printed per speed and shape, each the median over ``--seeds`` runs: the largest |error| from 20% to 50% done (before
the change), the largest from 60% to 90% done (after it), and from which fraction of rows on the error stayed
within +/-30%.
A speed that changes cannot be foreseen: before a halving at 50% any estimator that extrapolates the speed so
far is short by ``(1 - f) / (1.5 - f) - 1`` at ``f`` done (-38% at 20%, -50% at 50%), and before a doubling long by
``(1 - f) / (0.75 - f) - 1`` (+45% at 20%, +100% at 50%); this script shows how soon after the change the ETA
follows.

``--render N`` measures the same on a real run instead: ``render_manifest`` of N rows of the tiny model zoo
(sdxl-text2img, built in a temporary folder; Prefect's temporary API server), the first half at ``--steps``
denoising steps, the second at twice as many (so the rows take about twice as long from the middle on), batches
of 4, shards of 8. Every snapshot the flow publishes (once a second, as the terminal and the UI get them) is
compared with the time rendering actually took to end.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipaflow.flows.progress import ProgressEstimator  # noqa: E402

SPEEDS: dict[str, Callable[[float], float]] = {
    "steady": lambda done: 2.0,
    "halves at 50%": lambda done: 2.0 if done < 0.5 else 1.0,
    "doubles at 50%": lambda done: 1.0 if done < 0.5 else 2.0,
}
SHAPES = [(1, 8), (4, 16), (8, 4)]  # (workers, rows per batch)


def batches(rows: int, batch: int, workers: int, rate_of: Callable[[float], float], jitter: float = 0.2,
            seed: int = 0) -> list[tuple[float, int]]:
    """(end time, rows) of every batch of a synthetic run: ``workers`` take batches in turn, each at
    ``rate_of(fraction assigned) / workers`` rows/s, +/- ``jitter``; sorted by time."""
    rnd = random.Random(seed)
    free = [5.0 * (1 + rnd.random()) for _ in range(workers)]  # each worker loads its pipeline first
    assigned, events = 0, []
    while assigned < rows:
        worker = min(range(workers), key=free.__getitem__)
        size = min(batch, rows - assigned)
        free[worker] += size / (rate_of(assigned / rows) / workers) * (1 + jitter * (2 * rnd.random() - 1))
        assigned += size
        events.append((free[worker], size))
    return sorted(events)


def eta_errors(rows: int, batch: int, workers: int, rate_of: Callable[[float], float],
               seed: int = 0) -> list[tuple[float, float | None]]:
    """(fraction done, relative ETA error; None while there is no ETA) every second from 20% to 90% done."""
    events = batches(rows, batch, workers, rate_of, seed=seed)
    end, estimator, done, errors, now, i = events[-1][0], ProgressEstimator(), 0, [], 0.0, 0
    while now < end:
        while i < len(events) and events[i][0] <= now:
            done += events[i][1]
            estimator.observe(done, events[i][0])
            i += 1
        if 0.2 * rows <= done <= 0.9 * rows:
            eta = estimator.eta(rows - done, now)
            errors.append((done / rows, None if eta is None else (eta - (end - now)) / (end - now)))
        now += 1.0
    return errors


def within_from(errors: list[tuple[float, float | None]], bound: float = 0.3, after: float = 0.0) -> float:
    """The fraction done from which on (past ``after``) every error is within +/-``bound``."""
    bad = [done for done, error in errors if done >= after and (error is None or abs(error) > bound)]
    return max(bad, default=after)


def worst(errors: list[tuple[float, float | None]], low: float, high: float) -> float:
    return max((abs(e) for done, e in errors if low <= done < high and e is not None), default=0.0)


def render_errors(rows: int, steps: int) -> list[tuple[float, float | None]]:
    """(fraction done, relative ETA error) of every snapshot of a real tiny-zoo render, 20% to 90% done."""
    import os
    import tempfile
    import time

    import pandas as pd

    from ipaflow.flows import progress
    from ipaflow.flows.demo import draw_inputs
    from ipaflow.flows.render import render_manifest
    from ipaflow.tasks.zoo.build import build_zoo

    work = Path(tempfile.mkdtemp(prefix="ipaflow-eta-"))
    os.environ["IPAFLOW_MODELS"] = str(build_zoo(work / "zoo"))
    draw_inputs()["diner"].save(work / "diner.png")
    pd.DataFrame([{"id": f"r{i:04d}", "spec": "sdxl-text2img", "prompt": f"picture {i}", "ip_image": str(work / "diner.png"),
                   "num_inference_steps": steps if i < rows // 2 else 2 * steps, "width": 64, "height": 64}
                  for i in range(rows)]).to_parquet(work / "slower.parquet")
    seen: list[tuple[float, int, int, float | None]] = []

    def listener(snapshot) -> None:
        if snapshot.total and snapshot.phase.startswith("rendering"):
            seen.append((time.monotonic(), snapshot.done, snapshot.total, snapshot.eta))

    progress.add_listener(listener)
    try:
        render_manifest(str(work / "slower.parquet"), out=str(work / "out"),
                        options={"batch_size": 4, "shard_size": 8})
    finally:
        progress.remove_listener(listener)
    end = min(at for at, done, total, _ in seen if done == total)
    first = min(at for at, done, _, _ in seen if done > 0)
    middle = min(at for at, done, total, _ in seen if done >= total / 2)
    print(f"rendering: first rows done to half {middle - first:.1f}s, half to all {end - middle:.1f}s")
    return [(done / total, None if eta is None else (eta - (end - at)) / (end - at))
            for at, done, total, eta in seen if 0.2 * total <= done <= 0.9 * total and at < end]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--render", type=int, default=0, help="rows of a real tiny-zoo render (0: synthetic runs)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of the first half (--render)")
    args = parser.parse_args()
    if args.render:
        errors = render_errors(args.render, args.steps)
        known = [e for _, e in errors if e is not None]
        print(f"{args.render} rows, {args.steps} then {2 * args.steps} steps: {len(errors)} snapshots from 20% to 90% "
              f"done; largest |error| 20-50% {worst(errors, 0.2, 0.5):.0%}, 60-90% {worst(errors, 0.6, 0.91):.0%}; "
              f"median |error| {statistics.median(abs(e) for e in known):.0%}; within 30% from "
              f"{within_from(errors, after=0.2):.0%} done")
        return
    print("speed            workers x batch  max|err| 20-50%  max|err| 60-90%  within 30% from")
    for name, rate_of in SPEEDS.items():
        for workers, batch in SHAPES:
            runs = [eta_errors(args.rows, batch, workers, rate_of, seed) for seed in range(args.seeds)]
            before = statistics.median(worst(e, 0.2, 0.5) for e in runs)
            after = statistics.median(worst(e, 0.6, 0.91) for e in runs)
            since = statistics.median(within_from(e, after=0.2) for e in runs)
            print(f"{name:16} {workers} x {batch:<11} {before:>14.0%}  {after:>14.0%}  {since:>14.0%} done")


if __name__ == "__main__":
    main()
