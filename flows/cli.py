"""The ``ipaflow`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from flows.prefect_api import APIServerError, TemporaryAPIServer
from tasks.shards import DEFAULT_BATCH_SIZE

DEFAULT_ZOO = Path("~/.cache/ipaflow/zoo").expanduser()


def _quiet_environment() -> None:
    """Defaults that keep a command-line run quiet and offline-friendly; the user's settings win."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")  # run logs still reach the UI
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "ipaflow")  # ipaflow's own loggers too
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _storage_options(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError:
        raise SystemExit("ipaflow: --storage-options must be a JSON object") from None
    if not isinstance(options, dict):
        raise SystemExit("ipaflow: --storage-options must be a JSON object")
    return options


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--specs", action="append", default=[], metavar="DIR", help="extra spec folder (repeatable)")
    parser.add_argument("--storage-options", metavar="JSON", help="fsspec keyword arguments, as JSON")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipaflow", description="Batch renders with diffusers IP-Adapter pipelines.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="render a demo manifest covering every bundled spec")
    demo.add_argument("--out", default="ipaflow-demo", help="output folder (default ./ipaflow-demo)")
    demo.add_argument("--models", help=f"model folder (default $IPAFLOW_MODELS or the tiny zoo in {DEFAULT_ZOO})")

    render = commands.add_parser("render", help="render a manifest")
    render.add_argument("manifest", help="manifest URI or path (.parquet, .csv, .jsonl)")
    render.add_argument("--out", required=True, help="output URI or path")
    _add_common(render)
    render.add_argument("--models", help="folder of models in hub layout (default $IPAFLOW_MODELS)")
    render.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"rows per pipeline call (default {DEFAULT_BATCH_SIZE})")
    render.add_argument("--shard-size", type=int, help="rows per task (default: automatic)")
    cluster = render.add_mutually_exclusive_group()
    cluster.add_argument("--dask-address", help="existing Dask scheduler, e.g. tcp://host:8786")
    cluster.add_argument("--workers", type=int, help="start a local Dask cluster with N GPU workers")
    render.add_argument("--overwrite", action="store_true", help="render every row, even those already done")
    render.add_argument("--max-failures", type=int, help="stop submitting work once N rows failed")
    render.add_argument("--limit", type=int, help="only the first N manifest rows")
    render.add_argument("--dry-run", action="store_true", help="render a sample and estimate the whole run")

    validate = commands.add_parser("validate", help="check every row without rendering")
    validate.add_argument("manifest")
    _add_common(validate)
    validate.add_argument("--no-inputs", action="store_true", help="skip reading and decoding the inputs")

    zoo = commands.add_parser("zoo", help="the tiny model zoo").add_subparsers(dest="zoo_command", required=True)
    build = zoo.add_parser("build", help="write the tiny zoo in hub layout")
    build.add_argument("dir", nargs="?", default=str(DEFAULT_ZOO))
    build.add_argument("--force", action="store_true", help="rebuild even if a complete zoo is there")
    build.add_argument("--hf-cache", metavar="DIR",
                       help="also register the zoo in this HF hub cache, so bare hub ids load offline")
    build.add_argument("--full-size-sd15", action="store_true",
                       help="write a shape-true SD1.5 + IP-Adapter (random weights, float16) instead")

    specs = commands.add_parser("specs", help="bundled and user specs").add_subparsers(dest="specs_command", required=True)
    listing = specs.add_parser("list")
    listing.add_argument("--specs", action="append", default=[], metavar="DIR")
    show = specs.add_parser("show")
    show.add_argument("name")
    show.add_argument("--specs", action="append", default=[], metavar="DIR")

    serve = commands.add_parser("serve", help="serve the render flow as a deployment on a cron schedule")
    serve.add_argument("--manifest", required=True, help="manifest URI")
    serve.add_argument("--out", required=True, help="output URI; {date} and {datetime} are filled in per run")
    serve.add_argument("--cron", default="0 2 * * *", help="cron schedule (default: every day at 02:00)")
    serve.add_argument("--timezone", default="UTC", help="time zone of the cron schedule")
    serve.add_argument("--name", default="nightly", help="deployment name")
    serve.add_argument("--specs", action="append", default=[], metavar="DIR")
    serve.add_argument("--models", help="models folder (on the machines that render)")
    serve.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    serve.add_argument("--shard-size", type=int)
    serve.add_argument("--max-failures", type=int)
    serve_cluster = serve.add_mutually_exclusive_group()
    serve_cluster.add_argument("--dask-address", help="existing Dask scheduler, e.g. tcp://host:8786")
    serve_cluster.add_argument("--workers", type=int, help="a local Dask cluster with N GPU workers per run")
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_environment()  # before anything imports prefect, which reads its settings once
    args = _parser().parse_args(argv)
    handler = {
        "demo": cmd_demo,
        "render": cmd_render,
        "validate": cmd_validate,
        "zoo": cmd_zoo,
        "specs": cmd_specs,
        "serve": cmd_serve,
    }[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("ipaflow: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except APIServerError as exc:
        print(f"ipaflow: {exc}", file=sys.stderr)
        return 1


def cmd_zoo(args) -> int:
    import time

    from tasks.pipelines import quiet_libraries
    from tasks.zoo import build_full_size_sd15, build_zoo, link_into_hf_cache

    quiet_libraries()
    started = time.perf_counter()
    root = build_full_size_sd15(args.dir) if args.full_size_sd15 else build_zoo(args.dir, force=args.force)
    if args.hf_cache:
        link_into_hf_cache(root, args.hf_cache)
        print(f"registered in the HF cache {args.hf_cache} (use HF_HUB_CACHE={args.hf_cache} HF_HUB_OFFLINE=1)")
    size = sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
    print(f"zoo ready in {root} ({size / 1e6:.1f} MB, {time.perf_counter() - started:.1f}s)")
    print(f"use it with: export IPAFLOW_MODELS={root}")
    return 0


def cmd_specs(args) -> int:
    import yaml

    from specs.registry import SpecError, SpecRegistry

    try:
        registry = SpecRegistry(args.specs)
    except SpecError as exc:
        print(f"ipaflow: {exc}", file=sys.stderr)
        return 1
    if args.specs_command == "list":
        for name in registry.names():
            spec = registry.get(name)
            print(f"{name:24} {spec.task:10} {spec.model:48} {spec.description}")
        return 0
    try:
        spec = registry.get(args.name)
    except SpecError as exc:
        print(f"ipaflow: {exc}", file=sys.stderr)
        return 1
    print(f"# {registry.source(args.name)}")
    print(yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True), sort_keys=False).rstrip())
    return 0


def cmd_validate(args) -> int:
    from flows.validate import validate_manifest
    from specs.manifest import ManifestError
    from specs.registry import SpecError

    try:
        problems, rows = validate_manifest(args.manifest, args.specs, _storage_options(args.storage_options),
                                           check_inputs=not args.no_inputs)
    except (ManifestError, SpecError) as exc:
        print(f"ipaflow: {exc}", file=sys.stderr)
        return 1
    for problem in problems:
        print(problem)
    bad_rows = len({p.index for p in problems})
    print(f"{rows} rows checked: {rows - bad_rows} ok, {bad_rows} with problems", file=sys.stderr)
    return 1 if problems else 0


def _render(args, manifest: str, out: str, models: str | None, api_server=None) -> dict:
    import gc

    from pydantic import SecretStr

    options = _storage_options(getattr(args, "storage_options", None))
    on_a_cluster = bool(getattr(args, "dask_address", None) or getattr(args, "workers", None))
    if not on_a_cluster:
        _start_loading_first_pipeline(manifest, getattr(args, "specs", []), models, options)

    from flows.progress import terminal_progress
    from flows.render import render_manifest
    from flows.runners import make_task_runner

    runner, in_flight = make_task_runner(getattr(args, "dask_address", None), getattr(args, "workers", None))
    if api_server is not None:
        api_server.wait_until_ready()
    # The ~800k objects of torch, diffusers and Prefect outlive the run: keep them out of the collector's full
    # passes (0.3-0.5 s each, several per run on a CPU box).
    gc.freeze()
    try:
        with terminal_progress():
            return render_manifest.with_options(task_runner=runner)(
                manifest=manifest,
                out=out,
                specs=getattr(args, "specs", []),
                models=models,
                batch_size=getattr(args, "batch_size", DEFAULT_BATCH_SIZE),
                shard_size=getattr(args, "shard_size", None),
                storage_options=SecretStr(json.dumps(options)) if options else None,
                overwrite=getattr(args, "overwrite", False),
                max_failures=getattr(args, "max_failures", None),
                limit=getattr(args, "limit", None),
                max_in_flight=in_flight,
            )
    finally:
        gc.unfreeze()


def _start_loading_first_pipeline(manifest: str, spec_dirs: list[str], models: str | None, options: dict | None):
    """With the in-process runner, load the first shard's pipeline while Prefect starts its API server (both
    take seconds, on different resources); the shard task then finds it in the per-process cache. Any problem
    is left for the render itself to report."""
    import logging
    import threading

    def load() -> None:
        try:
            from specs.manifest import open_manifest
            from specs.registry import SpecRegistry
            from tasks.pipelines import PIPELINES

            registry = SpecRegistry(spec_dirs, storage_options=options)
            names = {row["spec"] for row in open_manifest(manifest, options).iter_rows(columns=("spec",))}
            known = sorted(name for name in names if isinstance(name, str) and name in registry)
            if known:
                PIPELINES.get(registry.get(known[0]), models)  # shards run in spec-name order
        except Exception:  # noqa: BLE001
            logging.getLogger("ipaflow.cli").debug("preloading the first pipeline failed", exc_info=True)

    threading.Thread(target=load, name="ipaflow-preload", daemon=True).start()


def print_summary(summary: dict) -> None:
    from tasks.storage import redact

    print(
        f"{summary['rows']} rows: {summary['rendered']} rendered, {summary['skipped']} already done, "
        f"{summary['failed']} failed ({summary['images']} images in {summary['seconds']:.1f}s)"
    )
    for failure in summary["failures"][:20]:
        print(f"  failed: {failure['id']}, {redact(failure['error'])}")
    if len(summary["failures"]) > 20:
        print(f"  ... and {len(summary['failures']) - 20} more (see the metadata)")
    print(f"outputs:  {redact(summary['out'])}")
    print(f"gallery:  {redact(summary['gallery'])}")


def cmd_render(args) -> int:
    from specs.manifest import ManifestError
    from specs.registry import SpecError

    if args.models:
        os.environ["IPAFLOW_MODELS"] = str(Path(args.models).expanduser().resolve())
    api_server = None if args.dry_run else TemporaryAPIServer.start_unless_configured()
    try:
        if args.dry_run:
            from flows.estimate import estimate_manifest, print_estimate

            print_estimate(estimate_manifest(args.manifest, args.specs, args.models, args.batch_size,
                                             _storage_options(args.storage_options)))
            return 0
        summary = _render(args, args.manifest, args.out, args.models, api_server)
    except (ManifestError, SpecError) as exc:
        print(f"ipaflow: {exc}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0 if summary["failed"] == 0 else 1


def cmd_demo(args) -> int:
    import time

    from flows.demo import write_demo
    from tasks.pipelines import quiet_libraries
    from tasks.zoo import build_zoo

    api_server = TemporaryAPIServer.start_unless_configured()  # starts while the zoo and models load
    quiet_libraries()
    models = args.models or os.environ.get("IPAFLOW_MODELS")
    if not models:
        started = time.perf_counter()
        models = str(build_zoo(DEFAULT_ZOO))
        print(f"tiny model zoo: {models} ({time.perf_counter() - started:.1f}s)")
    os.environ["IPAFLOW_MODELS"] = str(Path(models).expanduser().resolve())
    out = Path(args.out).resolve()
    manifest = write_demo(out)
    print(f"demo manifest: {manifest}")
    summary = _render(args, str(manifest), str(out), os.environ["IPAFLOW_MODELS"], api_server)
    print_summary(summary)
    print(f"open {out / 'index.html'} in a browser; records in {out / 'metadata'}")
    return 0 if summary["failed"] == 0 else 1


def cmd_serve(args) -> int:
    from flows.serve import serve_from_args

    return serve_from_args(args)


def entry_point() -> None:
    """The ``ipaflow`` console script. The process is the command's alone, so it skips the interpreter's last
    full garbage collection (the ~800k objects of torch, diffusers and Prefect: 3-4 s at exit on a CPU box)."""
    import gc

    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
