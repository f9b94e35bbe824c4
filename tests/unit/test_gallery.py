"""The gallery's escaping: prompts, ids, specs and errors are untrusted text, in element and attribute
context alike; links stay relative to the output folder."""

from __future__ import annotations

import html.parser
import json

from ipaflow.tasks.gallery import render_gallery

OUT = "/renders/run-1"
HOSTILE = [
    "\"><img src=x onerror=alert(1)>",
    "'><svg onload=alert(2)>",
    "</figcaption><script>alert(3)</script>",
    "<b>bold</b>&amp;",
]


class _Collect(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _records():
    records = []
    for number, text in enumerate(HOSTILE):
        records.append({"id": f"row-{number}", "spec": "sdxl-text2img", "status": "ok", "error": None,
                        "params": json.dumps({"prompt": text}), "outputs": [f"{OUT}/images/row-{number}.png"]})
    records.append({"id": HOSTILE[0], "spec": HOSTILE[1], "status": "failed", "error": HOSTILE[2],
                    "params": None, "outputs": []})
    return records


def test_hostile_text_stays_text():
    page = render_gallery(_records(), OUT)
    parsed = _Collect()
    parsed.feed(page)
    tags = {tag for tag, _ in parsed.tags}
    assert tags <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "div", "section", "figure", "a",
                    "img", "figcaption", "table", "tr", "th", "td"}, tags
    assert "script" not in tags and "svg" not in tags and "b" not in tags
    for _, attrs in parsed.tags:
        assert not any(name.startswith("on") for name in attrs), attrs
    images = [attrs for tag, attrs in parsed.tags if tag == "img"]
    assert [attrs["src"] for attrs in images] == [f"images/row-{n}.png" for n in range(len(HOSTILE))]
    text = "".join(parsed.text)
    for hostile in HOSTILE:
        assert hostile in text  # shown to the reader as typed
