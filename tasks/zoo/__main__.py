"""`python -m tasks.zoo DIR [--force] [--hf-cache DIR] [--full-size]`: build the zoo (see tasks.zoo)."""

from __future__ import annotations

import argparse
import time

from . import build_full_size_sd15, build_zoo, link_into_hf_cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.zoo", description=__doc__)
    parser.add_argument("root", help="folder to write the zoo into (hub layout: ROOT/org/name/...)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete zoo is there")
    parser.add_argument("--hf-cache", help="also register the repos in this HF hub cache folder")
    parser.add_argument("--full-size", action="store_true", help="write shape-true SD1.5 + IP-Adapter instead")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.full_size:
        root = build_full_size_sd15(args.root)
    else:
        root = build_zoo(args.root, force=args.force)
        if args.hf_cache:
            link_into_hf_cache(root, args.hf_cache)
    print(f"{root} ready in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
