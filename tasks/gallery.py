"""``index.html``: a small, self-contained gallery whatever the size of the run.

It shows the failed rows first (the first ``FAILURES_SHOWN`` by id, with the total and where the rest are:
``metadata/``, or ``ipaflow records``), then, per spec, the count of rendered rows and the first
``SAMPLES_PER_SPEC`` by id, each image with its own caption (its output's stem: ``a-0``, ``a-1`` for a row ``a``
with two images). ``GallerySample`` collects all that in one bounded pass over the records, so the page stays
well under a megabyte at millions of rows and the flow never holds the records.

Every manifest value is HTML-escaped (prompts are untrusted input); links are relative, so the folder can be
browsed from disk, copied, or served from a bucket. Images and GIFs are shown as ``<img>``, MP4 and WebM as a
muted, looping ``<video>``. Outputs inside containers (webdataset, parquet layouts) are
named rather than shown: a browser cannot open a member of a tar or a Parquet row.

Each caption shows the output's ``ip_similarity`` where it was scored; the page's "weakest first" link
(``index.html#weakest``) shows each spec's samples in the order of that score, weakest first, unscored last: CSS
alone (``:target`` and each figure's rank as ``order``), no script.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc

from ipaflow.core.storage import Storage, join
from ipaflow.specs.outputs import relative_to, split_member
from ipaflow.tasks.metadata_schema import CORE_SCHEMA, output_fields
from ipaflow.tasks.video import is_film

SAMPLES_PER_SPEC = 24
FAILURES_SHOWN = 100
CONTACT_SHEET_RECORDS = 64
STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;background:#fafafa;color:#222}
h1{margin:0 0 .3rem}.meta{color:#666;margin-bottom:1rem}
section{margin:1.5rem 0}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:.8rem}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:.4rem}
figure img,figure video{width:100%;image-rendering:pixelated;border-radius:4px}
figcaption{font-size:.8rem;overflow-wrap:anywhere}.id{font-weight:600}.prompt{color:#444}
table{border-collapse:collapse;font-size:.85rem}td,th{border:1px solid #ddd;padding:.3rem .5rem;text-align:left}
#weakest:target .grid figure{order:var(--rank)}.score{color:#666}
"""


class GallerySample:
    """Counts per spec and status, the first rows by id of each spec and the first failures: bounded."""

    COLUMNS = ["id", "spec", "status", "error", "outputs", "params", "ip_similarities"]

    def __init__(self, per_spec: int = SAMPLES_PER_SPEC, failures: int = FAILURES_SHOWN):
        self.per_spec, self.failures_kept = per_spec, failures
        self.ok: dict[str, int] = defaultdict(int)
        self.failed = 0
        self.samples: dict[str, list[dict]] = defaultdict(list)
        self.failures: list[dict] = []
        self.files: list[dict] = []  # the first ok records with plain files, for the contact sheet
        self.unrecorded = 0  # the run's failed rows with no record of their own
        self.unrecorded_rows: list[dict] = []  # the first of them: row (id and manifest row), spec, error

    def without_record(self, count: int, rows: list[dict]) -> None:
        """Failed rows that have no record to show (an unusable id, a second row of a duplicate id), as the run
        counted them: in the failed count, and listed by manifest row."""
        self.unrecorded, self.unrecorded_rows = count, rows[:self.failures_kept]

    def add(self, table: pa.Table) -> None:
        status = pc.fill_null(table.column("status"), "")
        ok = table.filter(pc.equal(status, "ok"))
        bad = table.filter(pc.not_equal(status, "ok"))
        self.failed += bad.num_rows
        if bad.num_rows:
            first = bad.sort_by("id").slice(0, self.failures_kept).to_pylist()
            self.failures = sorted(self.failures + first, key=lambda r: r["id"])[:self.failures_kept]
        if not ok.num_rows:
            return
        ok = ok.sort_by("id")
        specs = pc.fill_null(ok.column("spec"), "")
        for spec, count in zip(*[c.to_pylist() for c in pc.value_counts(specs).flatten()]):
            self.ok[spec] += count
            first = ok.filter(pc.equal(specs, spec)).slice(0, self.per_spec).to_pylist()
            self.samples[spec] = sorted(self.samples[spec] + first, key=lambda r: r["id"])[:self.per_spec]
        plain = [r for r in ok.slice(0, CONTACT_SHEET_RECORDS).to_pylist()
                 if r["outputs"] and split_member(r["outputs"][0])[1] is None]
        self.files = sorted(self.files + plain, key=lambda r: r["id"])[:CONTACT_SHEET_RECORDS]

    def plain_files(self) -> list[dict]:
        """The sampled ok records whose outputs are plain files, by id: what the contact sheet and the UI's
        per-spec previews can read (a member of a container cannot be read on its own)."""
        chosen: dict[str, dict] = {}
        for record in self.files + [r for rows in self.samples.values() for r in rows]:
            if record["outputs"] and split_member(record["outputs"][0])[1] is None:
                chosen.setdefault(record["id"], record)
        return sorted(chosen.values(), key=lambda r: r["id"])

    @classmethod
    def of(cls, records: list[dict]) -> GallerySample:
        sample = cls()
        if records:
            rows = [{c: r.get(c) for c in cls.COLUMNS} for r in records]
            schema = pa.schema([CORE_SCHEMA.field(name) for name in cls.COLUMNS])  # the records' own types
            sample.add(pa.Table.from_pylist(rows, schema=schema))
        return sample


def _link(uri: str, out: str) -> str:
    """The output's link, relative to ``index.html`` (the folder can be browsed from disk or a bucket)."""
    return "/".join(quote(part) for part in relative_to(uri, out).split("/"))


def _stem(uri: str) -> str:
    """The caption of one output: its stem (``a``, or ``a-0``, ``a-1`` for a row with two images)."""
    container, member = split_member(uri)
    name = (member or container).rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0].replace("%2E", ".")


def _ranks(records: list[dict]) -> list[int]:
    """Each output's place when the outputs of ``records`` are sorted by ip_similarity, weakest first (unscored
    last, in id order)."""
    scores = [score.get("ip_similarity") for record in records
              for score in output_fields(record.get("ip_similarities"), len(record["outputs"] or []))]
    order = sorted(range(len(scores)), key=lambda i: (scores[i] is None, scores[i] or 0.0, i))
    ranks = [0] * len(scores)
    for rank, index in enumerate(order):
        ranks[index] = rank
    return ranks


def _figure(record: dict, uri: str, out: str, prompt: str, rank: int, score: float | None) -> str:
    container, member = split_member(uri)
    shown_score = f"<div class='score'>ip_similarity {score:.3f}</div>" if score is not None else ""
    caption = (f"<figcaption><div class='id'>{html.escape(_stem(uri))}</div>"
               f"<div class='prompt'>{html.escape(prompt[:300])}</div>{shown_score}")
    opening = f"<figure style='--rank:{rank}'>"
    if member is not None:
        where = html.escape(relative_to(container, out))
        return f"{opening}{caption}<div class='meta'>in {where}</div></figcaption></figure>"
    link = _link(uri, out)
    label = html.escape(record["id"], quote=True)
    if is_film(uri):
        shown = f"<video src='{link}' autoplay loop muted playsinline preload='metadata' aria-label='{label}'></video>"
    else:
        shown = f"<img loading='lazy' src='{link}' alt='{label}'>"
    return f"{opening}<a href='{link}'>{shown}</a>{caption}</figcaption></figure>"


def render_gallery(records: list[dict] | GallerySample, out: str, title: str = "ipaflow renders",
                   contact_sheet: str | None = None) -> str:
    sample = records if isinstance(records, GallerySample) else GallerySample.of(records)
    ok = sum(sample.ok.values())
    failed = sample.failed + sample.unrecorded
    links = [f"<a href='#failed'>{failed} failed</a>" if failed else "0 failed"]
    if contact_sheet:
        links.append(f"<a href='{quote(contact_sheet)}'>contact sheet</a>")
    page = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><div class='meta'>{ok} rendered &middot; " + " &middot; ".join(links)
        + " &middot; every record: <code>metadata/</code> (<code>ipaflow records OUT</code>)"
        + " &middot; samples <a href='#weakest'>weakest ip_similarity first</a> or <a href='#'>by id</a></div>",
        "<div id='weakest'>",
    ]
    if sample.failed:
        shown = len(sample.failures)
        more = (f" (the first {shown} by id; all {sample.failed} are in <code>metadata/</code>)"
                if shown < sample.failed else "")
        page.append(f"<section id='failed'><h2>Failed rows: {sample.failed}{more}</h2>"
                    "<table><tr><th>id</th><th>spec</th><th>reason</th></tr>")
        for record in sample.failures:
            page.append(f"<tr><td>{html.escape(str(record['id']))}</td><td>{html.escape(str(record['spec']))}</td>"
                        f"<td>{html.escape(str(record['error']))}</td></tr>")
        page.append("</table></section>")
    if sample.unrecorded:
        shown = len(sample.unrecorded_rows)
        more = f" (the first {shown})" if shown < sample.unrecorded else ""
        anchor = "" if sample.failed else " id='failed'"
        page.append(f"<section{anchor}><h2>Failed rows without a record: "
                    f"{sample.unrecorded}{more}</h2><p>An unusable id, or a second row of an id: the run counts them "
                    "failed; <code>metadata/</code> has no record of their own.</p>"
                    "<table><tr><th>manifest row</th><th>spec</th><th>reason</th></tr>")
        for row in sample.unrecorded_rows:
            page.append(f"<tr><td>{html.escape(str(row['row']))}</td><td>{html.escape(str(row['spec'] or ''))}</td>"
                        f"<td>{html.escape(str(row['error']))}</td></tr>")
        page.append("</table></section>")
    for spec in sorted(sample.ok):
        rows = sample.samples[spec]
        count = sample.ok[spec]
        more = f" (the first {len(rows)} by id)" if len(rows) < count else ""
        page.append(f"<section><h2>{html.escape(spec)}: {count} rendered{more}</h2><div class='grid'>")
        ranks = iter(_ranks(rows))
        for record in rows:
            prompt = json.loads(record["params"] or "{}").get("prompt", "")
            scores = output_fields(record.get("ip_similarities"), len(record["outputs"] or []))
            for uri, score in zip(record["outputs"] or [], scores):
                page.append(_figure(record, uri, out, prompt, next(ranks), score.get("ip_similarity")))
        page.append("</div></section>")
    page.append("</div></body></html>")
    return "\n".join(page)


def write_gallery(storage: Storage, out: str, records: list[dict] | GallerySample,
                  contact_sheet: str | None = None) -> str:
    """Write ``<out>/index.html``; ``contact_sheet`` is the sheet's URI, linked when there is one."""
    uri = join(out, "index.html")
    sheet = contact_sheet.rsplit("/", 1)[-1] if contact_sheet else None
    storage.write_atomic(uri, render_gallery(records, out, contact_sheet=sheet).encode("utf-8"))
    return uri
