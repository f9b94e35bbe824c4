"""The ``ipaflow`` command line."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ipaflow.core.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_ROWS_FAILED, EXIT_TERMINATED, UserError
from ipaflow.flows.cli_parser import DEFAULT_ZOO, command_parser, options_from_args
from ipaflow.flows.console import one_line, quiet_console
from ipaflow.flows.prefect_api import TemporaryAPIServer
from ipaflow.specs.options import RenderOptions, default_models_folder

if TYPE_CHECKING:
    from ipaflow.flows.summary import RunSummary



def _quiet_environment() -> None:
    """Defaults that keep a command-line run quiet and offline-friendly; the user's settings win."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")  # run logs still reach the UI
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "ipaflow")  # ipaflow's own loggers too
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def main(argv: list[str] | None = None) -> int:
    from ipaflow.flows.progress import mark_command_start

    mark_command_start()  # the run's times include the command's start-up
    _quiet_environment()  # before anything imports prefect, which reads its settings once
    parser = command_parser()
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
        "records": cmd_records,
        "verify": cmd_verify,
    }[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        _interrupt.say()
        return _interrupt.code
    except UserError as exc:  # the user's to fix: one line, the error's own exit status (core/errors.py)
        print(f"ipaflow: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        if (line := one_line(exc, getattr(args, "out", None))) is None:
            raise
        print(f"ipaflow: {line}", file=sys.stderr)
        return EXIT_ROWS_FAILED


# -- a run stopped by its manifest, and Ctrl-C ------------------------------------------------------------------

class RunStopped(UserError):
    """A manifest or spec found unusable once the run had started (a later file of a manifest folder): the rows
    done so far are recorded; re-run once it is fixed."""

    exit_code = EXIT_ROWS_FAILED


class _Interrupt:
    """Ctrl-C (SIGINT) and SIGTERM end a run within seconds, with one line and exit status 130 or 143.

    The first signal raises KeyboardInterrupt in the main thread, as Python does for SIGINT; the flow engine
    records the run as crashed on its way out. What can keep the main thread from ending (a task runner joining
    a worker thread that is inside a pipeline call or a storage request) gets the signal again each second, and
    after GRACE_S the process ends anyway, as a second Ctrl-C ends it at once. Ending it skips joining busy
    worker threads: what they had not journaled is rendered again by the next run, as after a kill.

    During a flow run Prefect puts its own SIGTERM handler in place of this one (it raises TerminationSignal
    in the main thread). The signal is still seen here: a thread of ours reads the interpreter's wake-up
    file descriptor, written for every signal whatever the Python handler, and starts the same watchdog. The
    temporary Prefect API server runs in its own process group (a terminal's Ctrl-C does not reach it), so
    the run's last reports find it alive; it is stopped on the way out.
    """

    GRACE_S = 5.0
    ENDINGS = {signal.SIGINT: ("interrupted", EXIT_INTERRUPTED), signal.SIGTERM: ("terminated", EXIT_TERMINATED)}

    def __init__(self) -> None:
        self.first: float | None = None
        self.signum = signal.SIGINT
        self.handled = False  # main() caught the KeyboardInterrupt and returns
        self._presses = 0  # signals from outside (the watchdog's own are not counted)
        self._kicked = False  # the watchdog sent the pending signal, not the user
        self._begun = threading.Lock()
        self._said = threading.RLock()  # a second Ctrl-C may arrive while the first is being said
        self._saying = False
        self._ending = threading.Lock()  # the run is closed once, by whichever thread ends the process first

    @property
    def code(self) -> int:
        return self.ENDINGS[self.signum][1]

    @property
    def message(self) -> str:
        return f"ipaflow: {self.ENDINGS[self.signum][0]}; re-run the same command to resume"

    def install(self) -> None:
        for signum in self.ENDINGS:
            signal.signal(signum, self._on_signal)
        self._listen()

    def _listen(self) -> None:
        """See every SIGINT and SIGTERM, even while another handler (Prefect's) has them."""
        import socket

        reader, writer = socket.socketpair()
        writer.setblocking(False)
        try:
            signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        except ValueError:  # not the main thread
            return
        self._wakeup = (reader, writer)  # kept open for the life of the process

        def read() -> None:
            while data := reader.recv(64):
                for signum in data:
                    if signum in self.ENDINGS:
                        self._begin(signal.Signals(signum))

        threading.Thread(target=read, name="ipaflow-signals", daemon=True).start()

    def _begin(self, signum: int) -> None:
        """The first signal: remember which, and start the watchdog (once)."""
        with self._begun:
            if self.first is not None:
                return
            self.first = time.monotonic()
            self.signum = signal.Signals(signum)
        threading.Thread(target=self._watch, name="ipaflow-interrupt", daemon=True).start()

    def _on_signal(self, signum, frame) -> None:
        if self.handled:
            self.end()  # main() is on its way out already
        self._begin(signum)
        if self._kicked:
            self._kicked = False
        else:
            self._presses += 1
            if self._presses > 1:
                self.end()  # the user pressed Ctrl-C again
        raise KeyboardInterrupt

    def _watch(self) -> None:
        while time.monotonic() < self.first + self.GRACE_S:
            time.sleep(1.0)
            if not self.handled:
                self._kicked = True
                os.kill(os.getpid(), self.signum)
        self.end()

    def say(self) -> None:
        self.handled = True
        with self._said:
            if not self._saying:
                self._saying = True
                print(self.message, file=sys.stderr, flush=True)

    def end(self) -> None:
        """Leave now: the one line, the run in flight marked Cancelled in Prefect with its task runs (at most a
        few seconds), the temporary server stopped, the terminal's cursor back, no thread joined."""
        self.say()
        monitoring = sys.modules.get("ipaflow.flows.monitoring")  # not imported: no run began
        with self._ending:  # a second caller waits here, then ends the process itself
            if monitoring is not None:
                monitoring.close_interrupted(self.ENDINGS[self.signum][0])
        TemporaryAPIServer.stop_all()
        if sys.stderr.isatty():
            sys.stderr.write("\x1b[?25h")  # a progress bar interrupted mid-draw hides the cursor
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(self.code)


_interrupt = _Interrupt()


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

    from ipaflow.specs.registry import SpecRegistry

    registry = SpecRegistry(args.options.specs)
    if args.specs_command == "list":
        for name in registry.names():
            spec = registry.get(name)
            print(f"{name:24} {spec.task:10} {spec.model:48} {spec.description}")
        return 0
    spec = registry.get(args.name)
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
    from ipaflow.flows.validate import iter_validation

    counted: list[int] = []
    failed = 0
    said: set[str] = set()  # lines of problems several rows share (a duplicate id), said once
    for row in iter_validation(args.manifest, args.options, not args.no_inputs, counted.append,  # streamed
                               lambda line: print(f"warning: {line}", file=sys.stderr)):
        failed += 1
        for problem, line in zip(row.problems, row.lines()):
            if problem.shared:
                if line in said:
                    continue
                said.add(line)
            print(line)
    rows = counted[0]
    print(f"{rows} rows checked: {rows - failed} ok, {failed} with problems", file=sys.stderr)
    return 1 if failed else 0


def _render(manifest: str, out: str, options: RenderOptions, api_server=None) -> RunSummary:
    """Run the render flow in this process, showing its progress from the start (imports and Prefect's API
    server take seconds), and return its summary (also when it stopped at ``--max-failures``)."""
    import gc

    from ipaflow.flows.progress import set_phase, terminal_progress

    with terminal_progress():
        set_phase("importing torch, diffusers and Prefect" + ("; starting Prefect's API server" if api_server else ""))
        if not (options.dask_address or options.workers):
            _start_loading_first_pipeline(manifest, options)

        from ipaflow.flows.render import absolute_uri, render_manifest
        from ipaflow.flows.summary import summary_of

        if api_server is not None:
            set_phase("waiting for Prefect's API server")
            api_server.wait_until_ready()
        quiet_console()
        set_phase("starting the flow run")
        # The ~800k objects of torch, diffusers and Prefect outlive the run: keep them out of the collector's
        # full passes (0.3-0.5 s each, several per run on a CPU box).
        gc.freeze()
        try:
            # recorded absolute in the run's parameters: days later, which file ran is plain
            state = render_manifest(manifest=absolute_uri(manifest), out=absolute_uri(out), options=options,
                                    return_state=True)
        finally:
            gc.unfreeze()
    return summary_of(state)


def check_before_starting(manifest: str, options: RenderOptions) -> None:
    """Open the run (``flows.open_run``), so that a missing or unreadable manifest or spec folder is a one-line
    error before Prefect's API server starts and before a flow run exists (raises ManifestError or SpecError)."""
    from ipaflow.flows.open_run import open_run

    open_run(manifest, options)


def _start_loading_first_pipeline(manifest: str, options: RenderOptions):
    """With the in-process runner, load the first shard's pipeline (the spec of the manifest's first rows) while
    Prefect starts its API server (both take seconds, on different resources); the shard task then finds it in
    the per-process cache. Any problem is left for the render itself to report."""
    import threading

    def load() -> None:
        try:
            from ipaflow.flows.open_run import open_run
            from ipaflow.tasks.pipelines import PIPELINES

            run = open_run(manifest, options)
            # shards leave as the manifest streams: the first is most likely of the spec of its first rows
            first = next(run.manifest.iter_batches(batch_rows=1024, columns=("spec",)), None)
            known = [name for name in (first.values("spec") if first else [])
                     if isinstance(name, str) and name in run.registry]
            if known:
                PIPELINES.get(run.registry.get(known[0]), options.models)
        except Exception:  # noqa: BLE001
            logging.getLogger("ipaflow.cli").debug("preloading the first pipeline failed", exc_info=True)

    threading.Thread(target=load, name="ipaflow-preload", daemon=True).start()


def print_summary(summary: RunSummary) -> None:
    """The run summary (already free of credentials: the flow redacts what it returns)."""
    startup = summary.times.startup
    print(
        f"{summary.rows} rows: {summary.rendered} rendered, {summary.skipped} already done"
        + (f" ({summary.updated} records updated)" if summary.updated else "") + ", "
        f"{summary.failed} failed ({summary.images} images in {summary.seconds:.1f}s"
        + (f", {startup:.1f}s of it start-up)" if startup else ")")
    )
    for failure in summary.failures[:20]:
        print(f"  failed: {failure.row or failure.id}, {failure.error}")
    if summary.failed > 20:
        print(f"  ... and {summary.failed - 20} more (see the metadata)")
    print(f"outputs:  {summary.out}")
    print(f"gallery:  {summary.gallery}")


def cmd_render(args) -> int:
    from ipaflow.flows.open_run import NothingJudged
    from ipaflow.specs.manifest import ManifestError
    from ipaflow.specs.registry import SpecError

    options = args.options  # resolved by the run itself (RenderOptions.resolved), secrets kept out of its parameters
    check_before_starting(args.manifest, options)
    api_server = None if args.dry_run else TemporaryAPIServer.start_unless_configured()
    try:
        if args.dry_run:
            from datetime import datetime, timezone

            from ipaflow.flows.estimate import estimate_manifest, print_estimate
            from ipaflow.flows.render import absolute_uri, fill_template

            out = absolute_uri(fill_template(args.out, datetime.now(timezone.utc)))
            return print_estimate(estimate_manifest(args.manifest, out, options))
        summary = _render(args.manifest, args.out, options, api_server)
    except NothingJudged:  # the manifest changed before the run judged a row: nothing ran (exit 2)
        raise
    except (ManifestError, SpecError) as exc:  # once the run started: what ran is recorded
        raise RunStopped(str(exc)) from exc
    print_summary(summary)
    return EXIT_OK if summary.failed == 0 else EXIT_ROWS_FAILED


def cmd_demo(args) -> int:
    import time

    from ipaflow.flows.demo import write_demo
    from ipaflow.tasks.pipelines import quiet_libraries
    from ipaflow.tasks.zoo import build_zoo

    api_server = TemporaryAPIServer.start_unless_configured()  # starts while the zoo and models load
    quiet_libraries()
    models = args.models or default_models_folder()
    if not models:
        started = time.perf_counter()
        models = str(build_zoo(DEFAULT_ZOO))
        print(f"tiny model zoo: {models} ({time.perf_counter() - started:.1f}s)")
    options = RenderOptions(models=models)
    out = Path(args.out).resolve()
    manifest = write_demo(out)
    print(f"demo manifest: {manifest}")
    summary = _render(str(manifest), str(out), options, api_server)
    print_summary(summary)
    print(f"open {out / 'index.html'} in a browser; records in {out / 'metadata'}")
    return EXIT_OK if summary.failed == 0 else EXIT_ROWS_FAILED


def cmd_records(args) -> int:
    """``ipaflow records OUT [--output PATH] [--where FILTER]``: see ipaflow.flows.records."""
    from ipaflow.core.storage import Storage
    from ipaflow.flows.records import export_records

    storage = Storage(options=args.options.storage_options_dict())
    count = export_records(args.out, args.output, storage, where=args.where)
    print(f"{count} records" + (f" written to {storage.redact(args.output)}" if args.output else ""), file=sys.stderr)
    return 0


def cmd_verify(args) -> int:
    """``ipaflow verify OUT [--deep] [--repair]``: see ipaflow.flows.verify; 0 when consistent, else 1."""
    from ipaflow.core.storage import Storage
    from ipaflow.flows.verify import verify_folder

    problems = verify_folder(args.out, Storage(options=args.options.storage_options_dict()), args.deep, args.repair)
    print(f"{problems} problem(s)" if problems else "consistent", file=sys.stderr)
    return 1 if problems else 0


def cmd_serve(args) -> int:
    from ipaflow.flows.serve import make_deployment, serve_deployment

    serve_deployment(make_deployment(args.manifest, args.out, args.options, args.name, args.cron, args.timezone),
                     args.options)
    return 0


def entry_point() -> None:
    """The ``ipaflow`` console script. The process is the command's alone, so it skips the interpreter's last
    full garbage collection (the ~800k objects of torch, diffusers and Prefect: 3-4 s at exit on a CPU box)."""
    import gc

    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if command != "serve":  # serve keeps Prefect's own Ctrl-C: it pauses its schedules on the way out
        _interrupt.install()
        # --workers N: after a Ctrl-C, multiprocessing's resource tracker (a process of its own, started with
        # these options) cleans up the local Dask workers' semaphores, and would also print a warning about it
        sys.warnoptions.append("ignore::UserWarning:multiprocessing.resource_tracker")
    try:
        code = main()
    except KeyboardInterrupt:  # between the handler's return and main's (a second Ctrl-C)
        code = _interrupt.code
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        _interrupt.end()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
