"""The browser check's own rules (``scripts/ui_check.py``), without a browser: what counts as injected HTML, and
that it skips cleanly where Chromium is absent."""

from __future__ import annotations

import sys

from util import load_script

ui_check = load_script("scripts/ui_check.py")


def test_elements_count_as_injected_text_does_not():
    assert ui_check.injected('<p>"&gt;&lt;img src=x onerror=alert(1)&gt;.png <span title="&lt;img src=x '
                             'onerror=alert(1)&gt;">&lt;b&gt;bold&lt;/b&gt;</span></p>') == []
    found = ui_check.injected('<p>"><img src="x" onerror="alert(1)">.png <b>bold</b><script>alert(4)</script></p>')
    assert found == ["<img onerror=...>", "<img src=x>", "the manifest's <b>", "the manifest's <script>"]


def test_it_skips_without_chromium(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ui_check.py", "--chromium", "/nonexistent/chromium"])
    assert ui_check.main() == 0 and capsys.readouterr().out.startswith("skipped: no chromium")
