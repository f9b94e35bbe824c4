"""The Prefect API a command-line run talks to when no server is configured.

Prefect 3 always talks to an API. Without ``PREFECT_API_URL`` it starts a temporary server subprocess at the
first flow call, and to launch it the calling process first imports Prefect's whole server package (~5 s of
CPU here) before the subprocess spends ~8 s starting. ipaflow launches that same server (the command
Prefect's ``SubprocessASGIServer`` runs: uvicorn on Prefect's app factory, loopback only, UI off, the
temporary server's services) as the command's first step and points Prefect at it through
``PREFECT_API_URL``, so the server starts while torch, diffusers and the first pipeline load. Worker
processes of ``--workers N`` inherit the URL and report to the same server instead of starting one each.

The server runs in a session (process group) of its own: a Ctrl-C in the terminal reaches ipaflow, not the
server, so the interrupted run can still report to it (with a shared group it died first, and every report
ended in a connection-refused traceback). It still dies with ipaflow: ipaflow stops it on every way out, and
on Linux the kernel sends it SIGTERM when ipaflow dies, even by SIGKILL.

``APIBlinks`` keeps the terminal quiet while an API (this one or a configured server) cannot be reached.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

PORT_IN_USE_EXIT_CODE = 3  # uvicorn's exit status when the port was taken between choosing and binding it
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _end_with_parent():
    """On Linux, the child gets SIGTERM when the thread that started it (the main thread) dies, even by
    SIGKILL (the OOM killer): no server outlives a dead run. libc's prctl is looked up here, before the fork."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class APIServerError(RuntimeError):
    """The temporary server did not come up; the message says why and what to do."""


class TemporaryAPIServer:
    _running: set[TemporaryAPIServer] = set()  # what stop_all stops

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.port = 0
        self._errors = tempfile.TemporaryFile()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @classmethod
    def start_unless_configured(cls) -> TemporaryAPIServer | None:
        """Start one for this process, unless Prefect already has an API (environment, profile, a test
        harness) or its temporary mode is switched off. Prefect then uses it for every flow call."""
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

        if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
            return None
        server = cls()
        server._launch()
        cls._running.add(server)
        atexit.register(server.stop)
        return server

    @classmethod
    def stop_all(cls) -> None:
        """Stop every server this process started (a process that ends with os._exit runs no atexit)."""
        for server in list(cls._running):
            server.stop()

    def _launch(self) -> None:
        from prefect.context import refresh_global_settings_context
        from prefect.settings import get_current_settings

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                   "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),  # as Prefect
               "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=self._errors, preexec_fn=_end_with_parent(),
                                        start_new_session=True)
        os.environ["PREFECT_API_URL"] = self.api_url
        refresh_global_settings_context()  # Prefect's process-wide settings read the environment again

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Block until the server answers its health check (the flow call must not come earlier)."""
        if timeout is None:
            from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

            timeout = float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.process.poll()
            if status == PORT_IN_USE_EXIT_CODE:
                self._launch()  # another process took the port first: on a new one
                continue
            if status is not None:
                raise APIServerError(f"the temporary Prefect API server exited with status {status}: {self._stderr()}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise APIServerError(f"the temporary Prefect API server did not answer within {timeout:.0f}s "
                             "(raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or set PREFECT_API_URL)")

    def stop(self) -> None:
        TemporaryAPIServer._running.discard(self)
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def _stderr(self) -> str:
        self._errors.seek(0)
        return self._errors.read().decode(errors="replace").strip()[-2000:]


# What Prefect's clients log, a line every few seconds, while its API cannot be reached: the events worker's
# "failed to process item", the websocket's "Unable to connect", the log worker's failed sends.
_UNREACHABLE_SIGNS = ("failed to process item", "Unable to connect to", "Failed to send", "ConnectError",
                      "Connection refused", "All connection attempts failed", "ConnectionClosed")


class APIBlinks(logging.Filter):
    """Quiet while the Prefect API blinks: one WARNING line when its clients start failing to reach it, one
    when it answers again, instead of a stream of client errors that read as if the run were failing. The run
    goes on meanwhile; Prefect's clients retry, so its final state and artifacts reach the API once it is back.
    Put on the console's handlers; ipaflow's own records pass untouched."""

    POLL_S = 2.0

    def __init__(self, say: Callable[[str], None] | None = None, api_url: Callable[[], str] | None = None):
        super().__init__()
        self._say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self._api_url = api_url or _configured_api_url
        self._down = False
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("ipaflow") or record.levelno < logging.WARNING:
            return True
        error = record.exc_info[1] if record.exc_info else None
        text = f"{record.msg} {type(error).__name__ if error else ''} {error or ''}"
        if not any(sign in text for sign in _UNREACHABLE_SIGNS):
            return True
        self._went_down()
        return False

    def _went_down(self) -> None:
        with self._lock:
            if self._down:
                return
            self._down = True
        url = self._api_url()
        self._say(f"ipaflow: WARNING: the Prefect API {url} is unreachable; the run goes on, and its state and "
                  "artifacts reach the API once it is back")
        threading.Thread(target=self._wait_for_api, args=(url,), name="ipaflow-api-watch", daemon=True).start()

    def _wait_for_api(self, url: str) -> None:
        while True:
            time.sleep(self.POLL_S)
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError, ValueError):
                continue
        with self._lock:
            self._down = False
        self._say("ipaflow: the Prefect API is reachable again")


def _configured_api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or ""
