"""What the live updates of a run cost: the same manifest rendered with them on and off, on two Prefect APIs.

    python benchmarks/live_updates.py [--rows 160] [--steps 12] [--rounds 3] [--intervals 0,5] [--models DIR]

Live updates are the shards' per-batch reports and the flow's writes of the progress and failed-rows artifacts
every ``$IPAFLOW_LIVE_UPDATES`` seconds (default 5; 0 switches them off: artifacts at the start and the end only,
no reports). Each run is a whole ``ipaflow render`` process timed from outside, on:

- Prefect's temporary API server (SQLite), which ``ipaflow render`` starts itself when no API is configured;
- ``prefect server start`` backed by PostgreSQL from the system's packages: this script installs Debian's
  ``postgresql`` when its binaries are missing (as root, with apt-get), creates a throw-away cluster in a
  temporary folder (``initdb``, trust authentication, 127.0.0.1 only), starts it and the Prefect server, and
  stops both at the end.

Per API: one warm-up run (database created and migrated, caches warm; not counted), then ``--rounds`` rounds
that run every interval in turn, the order rotating from round to round. Printed per interval: the median wall
time and its ratio to "off" (median of the rounds' ratios); the CPU seconds the run used (the command and its
children, the temporary server included) and, for the separate server, the CPU seconds the Prefect server and
PostgreSQL used during the run, each with its ratio; and what the flow's thread spent writing to the API (from
the run summary). On a shared machine wall times swing with the neighbours' load, and CPU seconds too (torch's
threads spin while they wait for a core). So the script also times one live-update round by itself, ``--write-
rounds`` times against each API: the CPU it costs the flow's thread and the server, which does not depend on the
neighbours, and what share of a core that is at one round every 5 s.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
SUMMARY_ENV = "IPAFLOW_BENCH_SUMMARY"  # where the wrapped command writes its run summary (JSON)
SERVER_PIDS_ENV = "IPAFLOW_BENCH_SERVER_PIDS"  # the separate server's processes, for --write-cost
DEFAULT_INTERVAL_S = 5.0  # ipaflow's default $IPAFLOW_LIVE_UPDATES


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"{what} did not answer at {url} within {timeout:.0f}s")


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children (and theirs) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tree_cpu(*roots: int) -> float:
    """CPU seconds the processes ``roots`` and their descendants have used so far: the live ones, and those
    already gone through their parents' counters (Linux /proc)."""
    stats: dict[int, tuple[int, int]] = {}  # pid -> (parent, own + reaped children's clock ticks)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        stats[int(stat.parent.name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    total, todo = 0, list(roots)
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
            todo += [child for child, (parent, _) in stats.items() if parent == pid]
    return total / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------- PostgreSQL
def postgres_bin() -> Path:
    """The folder of PostgreSQL's server binaries; Debian's package installed first when missing."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found and shutil.which("initdb"):
        return Path(shutil.which("initdb")).parent
    if not found:
        if os.geteuid() != 0:
            raise SystemExit("PostgreSQL is not installed: run `sudo apt-get install -y postgresql`, then again")
        subprocess.run(["apt-get", "install", "-y", "postgresql"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent


class Postgres:
    """A throw-away PostgreSQL cluster on 127.0.0.1 (as the ``postgres`` user when this runs as root)."""

    def __init__(self, folder: Path):
        self.bin, self.data, self.port = postgres_bin(), folder / "pgdata", free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bin / tool), *args], check=True, stdout=subprocess.DEVNULL)

    def start(self) -> str:
        self.data.mkdir(parents=True)
        if self.as_user:
            shutil.chown(self.data, "postgres", "postgres")
        self.run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-instructions")
        self.run("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.data / "server.log"), "-o",
                 f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1", "start")
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "prefect")
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/prefect"

    def pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")


def start_prefect_server(database_url: str, home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    prefect = str(Path(sys.executable).with_name("prefect"))
    server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    wait_for(f"{url}/health", server, "prefect server")
    return server, url


# ---------------------------------------------------------------------------------------------- the runs
def wrapped_render(argv: list[str]) -> int:
    """``ipaflow render`` as users run it, writing its summary where ``$IPAFLOW_BENCH_SUMMARY`` says."""
    from ipaflow.flows import cli

    shown = cli.print_summary

    def print_and_keep(summary) -> None:
        shown(summary)
        Path(os.environ[SUMMARY_ENV]).write_text(summary.model_dump_json())

    cli.print_summary = print_and_keep
    return cli.main(["render", *argv])


def timed_render(manifest: Path, out: Path, interval: float, env: dict, extra: list[str],
                 servers: tuple[int, ...] = ()) -> dict:
    """One whole ``ipaflow render``: its wall and CPU seconds, the CPU seconds of the ``servers`` process trees
    meanwhile, and its run summary."""
    summary_file = out.with_suffix(".json")
    env = {**env, "IPAFLOW_LIVE_UPDATES": str(interval), SUMMARY_ENV: str(summary_file)}
    command = [sys.executable, str(Path(__file__).resolve()), "--wrapped", str(manifest), "--out", str(out), *extra]
    cpu, server_cpu = children_cpu(), tree_cpu(*servers)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"ipaflow render failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {"wall": wall, "cpu": children_cpu() - cpu, "server_cpu": tree_cpu(*servers) - server_cpu,
            "summary": json.loads(summary_file.read_text())}


def write_cost(rounds: int) -> None:
    """In a process of its own: ``rounds`` live-update rounds as the run monitor writes them at worst (the
    progress artifact and a failed-rows table of 50 reasons, both updated) against the environment's API (the
    temporary server when none is configured), after 10 rounds of warm-up. Prints, per round: wall ms, this
    thread's CPU ms and the server's CPU ms (JSON). CPU time barely depends on what else the machine runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate

    from ipaflow.flows.prefect_api import TemporaryAPIServer

    server = TemporaryAPIServer.start_unless_configured()
    if server is not None:
        server.wait_until_ready()
        pids: tuple[int, ...] = (server.process.pid,)
    else:
        pids = tuple(int(pid) for pid in os.environ[SERVER_PIDS_ENV].split(","))
    table = [{"rows": 50 - i, "column": "ip\\_image", "reason (first row's)": f"not found: /data/in/x{i}.png",
              "specs": "sdxl\\-text2img", "sample ids": "r1, r2, r3, r4, r5"} for i in range(50)]
    with get_client(sync_client=True) as client:
        progress_id = client.create_artifact(ArtifactCreate(type="progress", key="bench-progress", data=0.0)).id
        table_id = client.create_artifact(ArtifactCreate(type="table", key="bench-failed-rows",
                                                         data=json.dumps(table))).id

        def one_round(number: int) -> None:
            client.update_artifact(progress_id, ArtifactUpdate(
                data=100.0 * number / rounds, description=f"rendering: {number}/{rounds} rows, 3.2 rows/s, ETA 1m"))
            client.update_artifact(table_id, ArtifactUpdate(data=json.dumps(table), description=f"{number} failed"))

        for number in range(10):
            one_round(number)
        time.sleep(1.0)
        idle = tree_cpu(*pids)
        time.sleep(2.0)  # the server's own background work, to subtract
        idle_rate = (tree_cpu(*pids) - idle) / 2.0
        cpu, server_cpu, started = time.thread_time(), tree_cpu(*pids), time.perf_counter()
        for number in range(rounds):
            one_round(number)
        wall, cpu = time.perf_counter() - started, time.thread_time() - cpu
    time.sleep(1.0)  # work the server left for later
    server_cpu = tree_cpu(*pids) - server_cpu - idle_rate * (wall + 1.0)
    print(json.dumps({"wall_ms": 1000 * wall / rounds, "client_cpu_ms": 1000 * cpu / rounds,
                      "server_cpu_ms": 1000 * max(server_cpu, 0.0) / rounds}))
    if server is not None:
        server.stop()


def cost_line(label: str, env: dict, rounds: int) -> str:
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--write-cost", str(rounds)], env=env,
                          capture_output=True, text=True, check=True)
    cost = json.loads(done.stdout.strip().splitlines()[-1])
    share = (cost["client_cpu_ms"] + cost["server_cpu_ms"]) / 1000 / DEFAULT_INTERVAL_S
    return (f"{label:20} {cost['wall_ms']:>9.1f} {cost['client_cpu_ms']:>10.1f} {cost['server_cpu_ms']:>10.1f} "
            f"{100 * share:>9.2f}%")


def measure(label: str, manifest: Path, work: Path, env: dict, args, servers: tuple[int, ...] = ()) -> list[str]:
    extra = ["--batch-size", str(args.batch_size)]
    timed_render(manifest, work / f"{label}-warm-up", 0, env, extra)  # database created, caches warm: not counted
    runs: dict[float, list[dict]] = {i: [] for i in args.intervals}
    for round_ in range(args.rounds):
        order = args.intervals[round_ % len(args.intervals):] + args.intervals[:round_ % len(args.intervals)]
        for interval in order:
            run = timed_render(manifest, work / f"{label}-{interval}-{round_}", interval, env, extra, servers)
            assert run["summary"]["rendered"] == args.rows, run["summary"]
            runs[interval].append(run)
            print(f"  {label} round {round_ + 1}, live updates {interval or 'off'}: {run['wall']:.1f}s wall, "
                  f"{run['cpu']:.1f} CPU s, server {run['server_cpu']:.1f} CPU s, {run['summary']['live_updates']}",
                  flush=True)

    def median(interval: float, key: str) -> float:
        return statistics.median(run[key] for run in runs[interval])

    def ratio(interval: float, key: str) -> float:
        base = runs[args.intervals[0]]
        return statistics.median(run[key] / off[key] for run, off in zip(runs[interval], base) if off[key])

    lines = []
    for interval in args.intervals:
        live = [run["summary"]["live_updates"] for run in runs[interval]]
        server = f"{median(interval, 'server_cpu'):>8.1f} {ratio(interval, 'server_cpu'):>7.3f}" if servers else \
            f"{'-':>8} {'-':>7}"
        name = f"every {interval:g}s" if interval else "off"
        lines.append(f"{label:20} {name:>9} {median(interval, 'wall'):>7.1f} {ratio(interval, 'wall'):>7.3f} "
                     f"{median(interval, 'cpu'):>7.1f} {ratio(interval, 'cpu'):>7.3f} {server} "
                     f"{statistics.median(x['shard_reports'] for x in live):>7.0f} "
                     f"{statistics.median(x['api_writes'] for x in live):>6.0f} "
                     f"{statistics.median(x['api_seconds'] for x in live):>7.2f}")
    return lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--wrapped":
        sys.exit(wrapped_render(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "--write-cost":
        sys.exit(write_cost(int(sys.argv[2])))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill stops the servers this script started too
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=160)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--distinct", type=int, default=16, help="distinct image prompts")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--intervals", default="0,5", help="seconds between live updates, the first is the baseline")
    parser.add_argument("--models", help="hub-layout model folder (default: the tiny zoo, built if missing)")
    parser.add_argument("--apis", default="temporary,postgres", help="which Prefect APIs: temporary, postgres")
    parser.add_argument("--write-rounds", type=int, default=200, help="live-update rounds timed for their cost")
    args = parser.parse_args()
    args.intervals = [float(x) for x in args.intervals.split(",")]

    from throughput import write_manifest

    from ipaflow.tasks.zoo import build_zoo

    work = Path(tempfile.mkdtemp(prefix="ipaflow-live-"))
    os.chmod(work, 0o755)  # the postgres user creates its cluster inside
    models = Path(args.models) if args.models else build_zoo(Path.home() / ".cache/ipaflow/zoo")
    manifest = write_manifest(work, args.rows, args.distinct, args.steps)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "IPAFLOW_MODELS": str(models), "PREFECT_LOGGING_LEVEL": "WARNING",
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    print(f"{args.rows} rows of sdxl-text2img, {args.steps} steps, 64x64, batch size {args.batch_size}; "
          f"{args.rounds} rounds; work dir {work}", flush=True)
    lines, costs = [], []
    if "temporary" in args.apis:
        temporary = {**env, "PREFECT_HOME": str(work / "temp-home")}
        lines += measure("temporary (SQLite)", manifest, work, temporary, args)
        costs.append(cost_line("temporary (SQLite)", temporary, args.write_rounds))
    if "postgres" in args.apis:
        postgres = Postgres(work)
        server = None
        try:
            server, url = start_prefect_server(postgres.start(), work / "server-home")
            client = {**env, "PREFECT_HOME": str(work / "client-home"), "PREFECT_API_URL": url,
                      SERVER_PIDS_ENV: f"{server.pid},{postgres.pid()}"}
            lines += measure("server + PostgreSQL", manifest, work, client, args, servers=(server.pid, postgres.pid()))
            costs.append(cost_line("server + PostgreSQL", client, args.write_rounds))
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
            postgres.stop()
    print()
    print(f"{'Prefect API':20} {'live':>9} {'wall s':>7} {'x off':>7} {'CPU s':>7} {'x off':>7} {'server':>8} "
          f"{'x off':>7} {'reports':>7} {'writes':>6} {'write s':>7}")
    print("\n".join(lines))
    print("(medians of the rounds. wall s: the whole command; CPU s: the command and its children, the temporary "
          "server included; server: the CPU s of a separate Prefect server and PostgreSQL during the run; x off: "
          "median of the rounds' ratios to 'off'; reports, writes, write s: shard reports the flow received, its "
          "API write rounds and the seconds its thread spent in them)")
    print()
    print(f"{'Prefect API':20} {'wall ms':>9} {'client CPU':>10} {'server CPU':>10} {'of a core':>10}")
    print("\n".join(costs))
    print(f"(one live-update round at worst: the progress artifact and a 50-reason failed-rows table updated; per "
          f"round, means over {args.write_rounds}: wall ms, the flow thread's CPU ms and the server's (Prefect and "
          f"PostgreSQL, its idle work subtracted); of a core: both CPUs at one round every {DEFAULT_INTERVAL_S:g}s)")


if __name__ == "__main__":
    main()
