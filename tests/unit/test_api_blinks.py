"""While the Prefect API cannot be reached, its clients' errors are kept off the terminal: one line says the API
is unreachable, one that it is back (its health check answers again, here a real HTTP server on loopback)."""

from __future__ import annotations

import http.server
import logging
import threading
import time

from ipaflow.flows.prefect_api import APIBlinks


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == "/api/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def _record(name: str, message: str, *args, level=logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, args, None)


def test_one_line_when_the_api_goes_and_one_when_it_is_back():
    said: list[str] = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    url = f"http://127.0.0.1:{server.server_address[1]}/api"
    blinks = APIBlinks(say=said.append, api_url=lambda: url)
    blinks.POLL_S = 0.05
    noise = [_record("prefect._internal.concurrency", "Service %r failed to process item %r", "EventsWorker", "x"),
             _record("prefect.events.clients", "Unable to connect to %r. Reason: %s", "ws://x", "refused",
                     level=logging.WARNING)] * 5
    assert not any(blinks.filter(record) for record in noise)  # none reaches the terminal
    assert said == [f"ipaflow: WARNING: the Prefect API {url} is unreachable; the run goes on, and its state and "
                    "artifacts reach the API once it is back"]
    assert blinks.filter(_record("ipaflow.storage", "Connection refused"))  # ipaflow's own lines pass
    assert blinks.filter(_record("prefect.flow_runs", "Finished in state Failed"))  # and other errors
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        deadline = time.monotonic() + 5
        while len(said) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        server.shutdown()
        server.server_close()
    assert said[1:] == ["ipaflow: the Prefect API is reachable again"]
