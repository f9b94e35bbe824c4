"""The ``ipaflow`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Annotated, Any

from ipaflow.flows.prefect_api import APIServerError, TemporaryAPIServer
from ipaflow.specs.options import RenderOptions, parse_storage_options

DEFAULT_ZOO = Path("~/.cache/ipaflow/zoo").expanduser()


def _quiet_environment() -> None:
    """Defaults that keep a command-line run quiet and offline-friendly; the user's settings win."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")  # run logs still reach the UI
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "ipaflow")  # ipaflow's own loggers too
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


# -- render options as flags, derived from RenderOptions -------------------------------------------------------

def _field_parser(name: str):
    """argparse ``type=`` for one RenderOptions field: the field's own type and bounds, so that a bad value
    is a one-line usage error (exit 2) before anything starts."""
    from pydantic import TypeAdapter, ValidationError

    info = RenderOptions.model_fields[name]
    adapter = TypeAdapter(Annotated[info.annotation, info])

    def parse(text: str) -> Any:
        if name == "storage_options":
            try:
                parse_storage_options(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        try:
            return adapter.validate_python(text)
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(f"{exc.errors()[0]['msg'].lower()}, got {text!r}") from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def add_render_options(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """A flag per RenderOptions field (``--batch-size`` for ``batch_size``), with its help, bounds and default;
    ``only`` picks a subset (``validate`` takes the spec folders and storage options)."""
    for name, info in RenderOptions.model_fields.items():
        if only is not None and name not in only:
            continue
        extra = info.json_schema_extra or {}
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": info.description}
        if info.annotation is bool:
            kwargs["action"] = "store_true"
        elif info.annotation == list[str]:
            kwargs.update(action="append", metavar=extra.get("metavar"))
        else:
            kwargs.update(type=_field_parser(name), metavar=extra.get("metavar"))
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def options_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> RenderOptions:
    """The RenderOptions the flags given make (unset flags keep the model's defaults)."""
    from pydantic import ValidationError

    given = {name: getattr(args, name) for name in RenderOptions.model_fields if hasattr(args, name)}
    try:
        return RenderOptions(**given)
    except ValidationError as exc:
        parser.error("; ".join(item["msg"].removeprefix("Value error, ") for item in exc.errors()))


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (the usage of `render` alone is six): exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = _Parser(prog="ipaflow", description="Batch renders with diffusers IP-Adapter pipelines.")
    parser.add_argument("--version", action="version", version=f"ipaflow {version('ipaflow')}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser("demo", help="render a demo manifest covering every bundled spec")
    demo.add_argument("--out", default="ipaflow-demo", help="output folder (default ./ipaflow-demo)")
    demo.add_argument("--models", help=f"model folder (default $IPAFLOW_MODELS or the tiny zoo in {DEFAULT_ZOO})")

    render = commands.add_parser("render", help="render a manifest")
    render.add_argument("manifest", help="manifest URI or path (.parquet, .csv, .jsonl)")
    render.add_argument("--out", required=True, help="output URI or path; {date} and {datetime} are filled in")
    render.set_defaults(command_parser=render)
    add_render_options(render)
    render.add_argument("--dry-run", action="store_true", help="render a sample and estimate the whole run")

    validate = commands.add_parser("validate", help="check every row without rendering")
    validate.add_argument("manifest", help="manifest URI or path (.parquet, .csv, .jsonl)")
    validate.set_defaults(command_parser=validate)
    add_render_options(validate, only=("specs", "storage_options"))
    validate.add_argument("--no-inputs", action="store_true", help="skip reading and decoding the inputs")

    zoo = commands.add_parser("zoo", help="the tiny model zoo").add_subparsers(dest="zoo_command", required=True,
                                                                              metavar="COMMAND")
    build = zoo.add_parser("build", help="write the tiny zoo in hub layout")
    build.add_argument("dir", nargs="?", default=str(DEFAULT_ZOO), help=f"where (default {DEFAULT_ZOO})")
    build.add_argument("--force", action="store_true", help="rebuild even if a complete zoo is there")
    build.add_argument("--hf-cache", metavar="DIR",
                       help="also register the zoo in this HF hub cache, so bare hub ids load offline")
    build.add_argument("--full-size-sd15", action="store_true",
                       help="write a shape-true SD1.5 + IP-Adapter (random weights, float16) instead")

    specs = commands.add_parser("specs", help="bundled and user specs").add_subparsers(
        dest="specs_command", required=True, metavar="COMMAND")
    listing = specs.add_parser("list", help="every known spec: name, task, base model, description")
    listing.set_defaults(command_parser=listing)
    add_render_options(listing, only=("specs",))
    show = specs.add_parser("show", help="one spec, whole, as YAML")
    show.add_argument("name", help="the spec's name")
    show.set_defaults(command_parser=show)
    add_render_options(show, only=("specs",))

    serve = commands.add_parser("serve", help="serve the render flow as a deployment on a cron schedule")
    serve.add_argument("--manifest", required=True, help="manifest URI")
    serve.add_argument("--out", required=True, help="output URI; {date} and {datetime} are filled in per run")
    serve.set_defaults(command_parser=serve)
    add_render_options(serve)
    serve.add_argument("--cron", default="0 2 * * *", help="cron schedule (default: every day at 02:00)")
    serve.add_argument("--timezone", default="UTC", help="time zone of the cron schedule (default UTC)")
    serve.add_argument("--name", default="nightly", help="deployment name (default nightly)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from ipaflow.flows.progress import mark_command_start

    mark_command_start()  # the run's times include the command's start-up
    _quiet_environment()  # before anything imports prefect, which reads its settings once
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if hasattr(args, "command_parser"):
        args.options = options_from_args(args.command_parser, args)
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

    from ipaflow.tasks.pipelines import quiet_libraries
    from ipaflow.tasks.zoo import build_full_size_sd15, build_zoo, link_into_hf_cache

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

    from ipaflow.specs.registry import SpecError, SpecRegistry

    try:
        registry = SpecRegistry(args.options.specs)
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
    print(yaml.safe_dump(shown_spec(spec), sort_keys=False, allow_unicode=True).rstrip())
    return 0


def shown_spec(spec) -> dict:
    """The spec as ``specs show`` prints it: every field, defaults included (``output`` with the format the
    task writes when the spec names none); only components the spec leaves unset (null) are left out."""
    from ipaflow.specs.spec import OutputSpec

    shown = spec.model_dump(mode="json", exclude_none=True)
    output = (spec.output or OutputSpec()).model_copy(update={"format": spec.output_format})
    shown["output"] = output.model_dump(mode="json", exclude_none=True)
    return shown


def cmd_validate(args) -> int:
    from ipaflow.flows.validate import validate_manifest
    from ipaflow.specs.manifest import ManifestError
    from ipaflow.specs.registry import SpecError

    try:
        failed, rows = validate_manifest(args.manifest, args.options, check_inputs=not args.no_inputs)
    except (ManifestError, SpecError) as exc:  # nothing could be checked: like a usage error
        print(f"ipaflow: {exc}", file=sys.stderr)
        return 2
    printed = set()
    for row in failed:
        for line in row.lines():
            if line not in printed:  # rows sharing an id share their lines ("duplicate id (manifest rows 3, 7)")
                printed.add(line)
                print(line)
    print(f"{rows} rows checked: {rows - len(failed)} ok, {len(failed)} with problems", file=sys.stderr)
    return 1 if failed else 0


def _render(manifest: str, out: str, options: RenderOptions, api_server=None) -> dict:
    """Run the render flow in this process, showing its progress from the start (imports and Prefect's API
    server take seconds), and return its summary (also when it stopped at ``--max-failures``)."""
    import gc

    from ipaflow.flows.progress import set_phase, terminal_progress

    with terminal_progress():
        set_phase("importing torch, diffusers and Prefect" + ("; starting Prefect's API server" if api_server else ""))
        if not (options.dask_address or options.workers):
            _start_loading_first_pipeline(manifest, options)

        from ipaflow.flows.monitoring import summary_of
        from ipaflow.flows.render import render_manifest

        if api_server is not None:
            set_phase("waiting for Prefect's API server")
            api_server.wait_until_ready()
        set_phase("starting the flow run")
        # The ~800k objects of torch, diffusers and Prefect outlive the run: keep them out of the collector's
        # full passes (0.3-0.5 s each, several per run on a CPU box).
        gc.freeze()
        try:
            state = render_manifest(manifest=manifest, out=out, options=options, return_state=True)
        finally:
            gc.unfreeze()
    return summary_of(state)


def check_before_starting(manifest: str, options: RenderOptions) -> None:
    """Open the manifest and the spec folders, so that a missing or unreadable one is a one-line error before
    Prefect's API server starts and before a flow run exists (raises ManifestError or SpecError)."""
    from ipaflow.core.storage import Storage
    from ipaflow.specs.manifest import open_manifest
    from ipaflow.specs.registry import SpecRegistry

    storage = Storage(options=options.storage_options_dict())
    open_manifest(manifest, storage)
    SpecRegistry(options.specs, storage=storage)


def _start_loading_first_pipeline(manifest: str, options: RenderOptions):
    """With the in-process runner, load the first shard's pipeline while Prefect starts its API server (both
    take seconds, on different resources); the shard task then finds it in the per-process cache. Any problem
    is left for the render itself to report."""
    import logging
    import threading

    def load() -> None:
        try:
            from ipaflow.core.storage import Storage
            from ipaflow.specs.manifest import open_manifest
            from ipaflow.specs.registry import SpecRegistry
            from ipaflow.tasks.pipelines import PIPELINES

            storage = Storage(options=options.storage_options_dict())
            registry = SpecRegistry(options.specs, storage=storage)
            names = {row["spec"] for row in open_manifest(manifest, storage).iter_rows(columns=("spec",))}
            known = sorted(name for name in names if isinstance(name, str) and name in registry)
            if known:
                PIPELINES.get(registry.get(known[0]), options.models)  # shards run in spec-name order
        except Exception:  # noqa: BLE001
            logging.getLogger("ipaflow.cli").debug("preloading the first pipeline failed", exc_info=True)

    threading.Thread(target=load, name="ipaflow-preload", daemon=True).start()


def print_summary(summary: dict) -> None:
    """The run summary (already free of credentials: the flow redacts what it returns)."""
    startup = summary["times"]["startup"]
    print(
        f"{summary['rows']} rows: {summary['rendered']} rendered, {summary['skipped']} already done, "
        f"{summary['failed']} failed ({summary['images']} images in {summary['seconds']:.1f}s"
        + (f", {startup:.1f}s of it start-up)" if startup else ")")
    )
    for failure in summary["failures"][:20]:
        print(f"  failed: {failure['id']}, {failure['error']}")
    if len(summary["failures"]) > 20:
        print(f"  ... and {len(summary['failures']) - 20} more (see the metadata)")
    print(f"outputs:  {summary['out']}")
    print(f"gallery:  {summary['gallery']}")


def cmd_render(args) -> int:
    from ipaflow.specs.manifest import ManifestError
    from ipaflow.specs.registry import SpecError

    options = args.options
    if options.models:
        options = options.model_copy(update={"models": str(Path(options.models).expanduser().resolve())})
        os.environ["IPAFLOW_MODELS"] = options.models
    try:
        check_before_starting(args.manifest, options)
    except (ManifestError, SpecError) as exc:
        print(f"ipaflow: {exc}", file=sys.stderr)
        return 2
    api_server = None if args.dry_run else TemporaryAPIServer.start_unless_configured()
    try:
        if args.dry_run:
            from ipaflow.flows.estimate import estimate_manifest, print_estimate

            print_estimate(estimate_manifest(args.manifest, options))
            return 0
        summary = _render(args.manifest, args.out, options, api_server)
    except (ManifestError, SpecError) as exc:
        print(f"ipaflow: {exc}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0 if summary["failed"] == 0 else 1


def cmd_demo(args) -> int:
    import time

    from ipaflow.flows.demo import write_demo
    from ipaflow.tasks.pipelines import quiet_libraries
    from ipaflow.tasks.zoo import build_zoo

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
    summary = _render(str(manifest), str(out), RenderOptions(models=os.environ["IPAFLOW_MODELS"]), api_server)
    print_summary(summary)
    print(f"open {out / 'index.html'} in a browser; records in {out / 'metadata'}")
    return 0 if summary["failed"] == 0 else 1


def cmd_serve(args) -> int:
    from ipaflow.flows.serve import make_deployment, serve_deployment

    serve_deployment(make_deployment(args.manifest, args.out, args.options, args.name, args.cron, args.timezone),
                     args.options)
    return 0


def entry_point() -> None:
    """The ``ipaflow`` console script. The process is the command's alone, so it skips the interpreter's last
    full garbage collection (the ~800k objects of torch, diffusers and Prefect: 3-4 s at exit on a CPU box)."""
    import gc

    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
