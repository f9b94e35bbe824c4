"""The gallery: untrusted text stays text (prompts, ids, specs and errors, in element and attribute context
alike), links stay relative to the output folder; failed rows come first, each image has its own caption, and
the page stays small whatever the size of the run."""

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
                    "img", "figcaption", "table", "tr", "th", "td", "code"}, tags
    assert "script" not in tags and "svg" not in tags and "b" not in tags
    for _, attrs in parsed.tags:
        assert not any(name.startswith("on") for name in attrs), attrs
    images = [attrs for tag, attrs in parsed.tags if tag == "img"]
    assert [attrs["src"] for attrs in images] == [f"images/row-{n}.png" for n in range(len(HOSTILE))]
    text = "".join(parsed.text)
    for hostile in HOSTILE:
        assert hostile in text  # shown to the reader as typed


def test_failures_first_one_caption_per_image_and_bounded_size():
    import pyarrow as pa

    from ipaflow.tasks.gallery import FAILURES_SHOWN, SAMPLES_PER_SPEC, GallerySample

    sample = GallerySample()
    schema = pa.schema([("id", pa.string()), ("spec", pa.string()), ("status", pa.string()), ("error", pa.string()),
                        ("outputs", pa.list_(pa.string())), ("params", pa.string())])
    for part in range(50):  # 100k records in parts, as the metadata folder holds them
        rows = [{"id": f"r{part:02d}-{i:04d}", "spec": "sdxl-text2img", "status": "failed" if i % 10 == 0 else "ok",
                 "error": "ip_image: not found" if i % 10 == 0 else None,
                 "outputs": [] if i % 10 == 0 else [f"{OUT}/images/r{part:02d}-{i:04d}-{k}.png" for k in range(2)],
                 "params": json.dumps({"prompt": "p" * 200})} for i in range(2000)]
        sample.add(pa.Table.from_pylist(rows, schema=schema))
    page = render_gallery(sample, OUT)
    assert len(page.encode()) < 200_000
    assert sample.ok["sdxl-text2img"] == 90_000 and sample.failed == 10_000
    assert "<a href='#failed'>10000 failed</a>" in page
    assert page.index("id='failed'") < page.index("<h2>sdxl-text2img")  # the failures come first
    assert page.count("<tr><td>") == FAILURES_SHOWN and "all 10000 are in <code>metadata/</code>" in page
    assert "sdxl-text2img: 90000 rendered (the first 24 by id)" in page
    parsed = _Collect()
    parsed.feed(page)
    captions = [text for text in parsed.text if text.startswith("r00-") and text.count("-") == 2]
    assert captions[:4] == ["r00-0001-0", "r00-0001-1", "r00-0002-0", "r00-0002-1"]  # one caption per image
    assert len([tag for tag, _ in parsed.tags if tag == "img"]) == 2 * SAMPLES_PER_SPEC


def test_rows_without_a_record_are_counted_and_listed_by_manifest_row():
    from ipaflow.tasks.gallery import GallerySample

    sample = GallerySample.of([{"id": "dup", "spec": "s", "status": "failed", "error": "id: duplicate id",
                                "outputs": [], "params": "{}"}])
    sample.without_record(2, [{"row": "manifest row 1", "spec": None, "error": "id: '<b>a/b</b>' is not a valid id"},
                              {"row": "dup (manifest row 5)", "spec": "s", "error": "id: duplicate id"}])
    page = render_gallery(sample, OUT)
    assert "3 failed</a>" in page and "Failed rows without a record: 2" in page
    assert "<td>manifest row 1</td>" in page and "<td>dup (manifest row 5)</td>" in page
    assert "&lt;b&gt;a/b&lt;/b&gt;" in page and "<b>a/b" not in page
