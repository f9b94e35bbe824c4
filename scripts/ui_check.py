"""Do ipaflow's artifacts show a manifest's text as written, and safely, in both of Prefect's UIs? Checked in a
real browser.

    python scripts/ui_check.py [--chromium /usr/bin/chromium] [--timeout 20]

Starts ``prefect server start`` on a free 127.0.0.1 port (a throw-away ``PREFECT_HOME``), runs ``ipaflow render``
of a manifest whose rows carry hostile text (markdown, HTML with an ``onerror``, backticks, ``#27``, underscores,
pipes, a newline; in spec names, input paths, the manifest's and the output folder's names) against it, then
opens the run's artifacts (progress, failed rows, summary) in headless Chromium, driven over the DevTools
protocol, in the new UI (``/v2/...``, what ``/`` opens in Prefect 3.9) and the classic one, and compares the
page's visible text with the hostile strings (whitespace folded, as markdown shows a newline). No model is
loaded: every row fails before rendering, which is what puts manifest text into the artifacts.

It fails (exit 1) when a string is missing from a page, when a page holds an element the manifest's HTML would
make (an ``onerror`` attribute, an image from ``src=x``, a ``<script>`` or ``<b>`` from a cell), when a
JavaScript dialog opens (``alert``), or when a percentage shows more than one decimal. Without Chromium it says
so and exits 0 (skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HOSTILE_SPEC = "<b>bold</b><script>alert(4)</script>"
HOSTILE_PATH = '"><img src=x onerror=alert(1)>.png'
MARKDOWN_PATH = "#27 *not* _em_ a|b ~~s~~ [l](x).png"
NEWLINE_PATH = "new\nline `tick`.png"
HOSTILE_OUT = "out <i>1</i> *2* [3](x) `4` | 5"
HOSTILE_MANIFEST = "set_#27 `x` *y*.csv"
# what each artifact must show, as written (whitespace folded)
EXPECTED = {
    "failed-rows": [HOSTILE_SPEC, HOSTILE_PATH, MARKDOWN_PATH, NEWLINE_PATH, "ip_image", "style_folder",
                    "`ipaflow specs list`", "(unknown spec)"],
    "summary": [HOSTILE_OUT, HOSTILE_MANIFEST, "Completed with failures"],
    "progress": ["4/4 rows (100.0%)"],
}


def folded(text: str) -> str:
    return " ".join(text.split())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def write_manifest(folder: Path) -> Path:
    """Four rows, each failing before rendering with hostile text in its message."""
    import csv

    (folder / "style dir").mkdir()
    rows = [
        {"id": "unknown_spec", "spec": HOSTILE_SPEC, "ip_image": "x.png", "style_folder": ""},
        {"id": "html_path", "spec": "sdxl-text2img", "ip_image": str(folder / HOSTILE_PATH), "style_folder": ""},
        {"id": "markdown_path", "spec": "sdxl-multi-style-face", "ip_image": str(folder / MARKDOWN_PATH),
         "style_folder": str(folder / "style dir")},
        {"id": "newline_path", "spec": "sdxl-multi-style-face", "ip_image": str(folder / "face.png"),
         "style_folder": str(folder / NEWLINE_PATH)},
    ]
    path = folder / HOSTILE_MANIFEST
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "face.png").write_bytes(b"")  # present; the row fails on its style folder first or alongside
    return path


class Browser:
    """Headless Chromium on the DevTools protocol (plain websockets): open a page, wait, read its text and DOM,
    note any JavaScript dialog."""

    def __init__(self, executable: str, profile: Path):
        self.process = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.2)
        self.port = int(port_file.read_text().split()[0])

    def read(self, url: str, wait_for_text: list[str], timeout: float) -> tuple[str, str, list[str]]:
        """(visible text, DOM, dialogs opened) of ``url``, once every ``wait_for_text`` shows or ``timeout``."""
        from websockets.sync.client import connect

        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
        target = json.loads(urllib.request.urlopen(request).read())
        dialogs: list[str] = []
        with connect(target["webSocketDebuggerUrl"], max_size=None) as ws:
            counter = iter(range(1, 1_000_000))

            def call(method: str, **params):
                number = next(counter)
                ws.send(json.dumps({"id": number, "method": method, "params": params}))
                while True:
                    message = json.loads(ws.recv(timeout=timeout))
                    if message.get("method") == "Page.javascriptDialogOpening":
                        dialogs.append(message["params"].get("message", ""))
                        ws.send(json.dumps({"id": next(counter), "method": "Page.handleJavaScriptDialog",
                                            "params": {"accept": True}}))
                    if message.get("id") == number:
                        return message.get("result", {})

            call("Page.enable")
            call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout
            text = dom = ""
            while time.monotonic() < deadline:
                time.sleep(0.5)
                text = call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                            returnByValue=True).get("result", {}).get("value", "")
                if all(folded(want) in folded(text) for want in wait_for_text):
                    time.sleep(1.0)  # let late scripts run: a dialog would open now
                    break
            text = call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                        returnByValue=True).get("result", {}).get("value", "")
            dom = call("Runtime.evaluate", expression="document.documentElement.outerHTML",
                       returnByValue=True).get("result", {}).get("value", "")
        urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/close/{target['id']}").read()
        return text, dom, dialogs

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def injected(dom: str) -> list[str]:
    """Elements or attributes in the page that only the manifest's HTML could have made (text that merely reads
    like HTML, in a text node or an attribute's value, is fine)."""
    from html.parser import HTMLParser

    found: list[str] = []

    class Scan(HTMLParser):
        def __init__(self):
            super().__init__()
            self.open: list[str] = []

        def handle_starttag(self, tag, attrs):
            names = dict(attrs)
            if "onerror" in names:
                found.append(f"<{tag} onerror=...>")
            if tag == "img" and names.get("src") == "x":
                found.append("<img src=x>")
            self.open.append(tag)

        def handle_endtag(self, tag):
            if tag in self.open:
                del self.open[len(self.open) - 1 - self.open[::-1].index(tag):]

        def handle_data(self, data):
            tag = self.open[-1] if self.open else ""
            if (tag, data) in (("b", "bold"), ("i", "1")) or (tag == "script" and "alert(4)" in data):
                found.append(f"the manifest's <{tag}>")

    Scan().feed(dom)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds a page may take to show its text")
    args = parser.parse_args()
    if not Path(args.chromium).exists():
        print(f"skipped: no chromium at {args.chromium}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="ipaflow-ui-check-"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_API_URL": api, "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=(work / "server.log").open("w"),
                              stderr=subprocess.STDOUT)
    browser = None
    failures: list[str] = []
    try:
        wait_for(f"{api}/health", 120)
        manifest = write_manifest(work)
        out = work / HOSTILE_OUT
        render = subprocess.run([sys.executable, "-m", "ipaflow.flows.cli", "render", str(manifest), "--out",
                                 str(out)], env=env, capture_output=True, text=True, timeout=600)
        print(f"ipaflow render exited {render.returncode} (1: rows failed, as meant)")
        if render.returncode != 1:
            print(render.stdout, render.stderr, sep="\n")
            return 1
        os.environ.update(PREFECT_API_URL=api, PREFECT_HOME=env["PREFECT_HOME"])
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts()
        by_role = {role: a for a in artifacts for role in EXPECTED if a.key.endswith(f"-{role}")}
        browser = Browser(args.chromium, work / "chromium")
        for ui, prefix in (("new UI", "/v2"), ("classic UI", "")):
            for role, wanted in EXPECTED.items():
                url = f"http://127.0.0.1:{port}{prefix}/artifacts/artifact/{by_role[role].id}"
                text, dom, dialogs = browser.read(url, wanted, args.timeout)
                missing = [w for w in wanted if folded(w) not in folded(text)]
                problems = [f"missing {w!r}" for w in missing] + [f"has {what}" for what in injected(dom)]
                problems += [f"a dialog opened: {message!r}" for message in dialogs]
                problems += [f"shows {p}" for p in re.findall(r"\d+\.\d{2,}%", text)]
                print(f"{ui:10}  {role:11}  {'ok' if not problems else 'FAILED: ' + '; '.join(problems)}")
                failures += [f"{ui} {role}: {p}" for p in problems]
    finally:
        if browser is not None:
            browser.close()
        server.terminate()
        server.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    print("all strings shown as written, nothing injected, no dialog" if not failures else
          f"{len(failures)} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
