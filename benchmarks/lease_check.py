"""What fencing costs a write: the lease check a ``FencedStorage`` makes before each write and delete
(``ipaflow.core.lease.Fence.check``), on a local disk and on moto's S3 server (loopback HTTP), next to the write
it guards (a 64 KiB ``write_atomic``, about one encoded image).

Three figures per store, medians of --repeats runs of --checks each:
- ``read``: a check that reads the lease (one small GET and a JSON parse), as after a pause or when the last
  heartbeat read is older than ttl / 2;
- ``cached``: a check within ttl / 2 of the heartbeat it last read (no request), as for nearly every write;
- ``write``: the guarded 64 KiB write itself, unfenced.

    python benchmarks/lease_check.py
    python benchmarks/lease_check.py --checks 500 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def per_call(fn, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return (time.perf_counter() - start) / count


def measure(out: str, storage, checks: int, repeats: int) -> dict[str, float]:
    from ipaflow.core.lease import OutputLease
    from ipaflow.core.storage import join

    figures: dict[str, list[float]] = {"read": [], "cached": [], "write": []}
    blob = os.urandom(64 * 1024)
    with OutputLease(storage, out, run="bench", ttl=3600) as lease:
        fence = lease.fence()

        def read() -> None:
            fence._seen = None  # forget the last read: the check reads the lease again
            fence.check()

        for _ in range(repeats):
            figures["read"].append(per_call(read, checks))
            figures["cached"].append(per_call(fence.check, checks))
            figures["write"].append(per_call(lambda: storage.write_atomic(join(out, "images/x.png"), blob),
                                             max(1, checks // 5)))
    return {name: statistics.median(values) for name, values in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from s3 import MotoS3

    from ipaflow.core.storage import Storage

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        results["local disk"] = measure(os.path.join(folder, "out"), Storage(), args.checks, args.repeats)
    moto = MotoS3()
    try:
        bucket = moto.bucket(f"bench-{uuid.uuid4().hex[:8]}")
        storage = Storage(options={"client_kwargs": {"endpoint_url": moto.endpoint, "region_name": "us-east-1"}})
        results["moto S3"] = measure(f"s3://{bucket}/out", storage, args.checks, args.repeats)
    finally:
        moto.close()
    print(f"{'store':<12} {'read (ms)':>10} {'cached (us)':>12} {'64 KiB write (ms)':>18} {'read / write':>13}")
    for store, figures in results.items():
        print(f"{store:<12} {figures['read'] * 1e3:>10.3f} {figures['cached'] * 1e6:>12.2f} "
              f"{figures['write'] * 1e3:>18.3f} {figures['read'] / figures['write']:>13.2f}")


if __name__ == "__main__":
    main()
