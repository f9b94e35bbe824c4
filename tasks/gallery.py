"""``index.html``: a self-contained gallery of the outputs with their prompts, and the failed rows' reasons.

Every manifest value is HTML-escaped (prompts are untrusted input); links are relative, so the folder can be
browsed from disk, copied, or served from a bucket.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from urllib.parse import quote

from ipaflow.core.storage import Storage, join
from ipaflow.specs.outputs import relative_to

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;background:#fafafa;color:#222}
h1{margin:0 0 .3rem}.meta{color:#666;margin-bottom:1rem}
section{margin:1.5rem 0}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:.8rem}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:.4rem}
figure img{width:100%;image-rendering:pixelated;border-radius:4px}
figcaption{font-size:.8rem;overflow-wrap:anywhere}.id{font-weight:600}.prompt{color:#444}
table{border-collapse:collapse;font-size:.85rem}td,th{border:1px solid #ddd;padding:.3rem .5rem;text-align:left}
"""


def _link(uri: str, out: str) -> str:
    """The output's link, relative to ``index.html`` (the folder can be browsed from disk or a bucket)."""
    return "/".join(quote(part) for part in relative_to(uri, out).split("/"))


def render_gallery(records: list[dict], out: str, title: str = "ipaflow renders",
                   contact_sheet: str | None = None) -> str:
    by_spec: dict[str, list[dict]] = defaultdict(list)
    failed = []
    for record in sorted(records, key=lambda r: r["id"]):
        (by_spec[record["spec"]] if record["status"] == "ok" else failed).append(record)
    ok = sum(len(v) for v in by_spec.values())
    page = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><div class='meta'>{ok} rendered, {len(failed)} failed"
        + (f" &middot; <a href='{quote(contact_sheet)}'>contact sheet</a>" if contact_sheet else "") + "</div>",
    ]
    for spec in sorted(by_spec):
        page.append(f"<section><h2>{html.escape(spec)}</h2><div class='grid'>")
        for record in by_spec[spec]:
            prompt = json.loads(record["params"] or "{}").get("prompt", "")
            for uri in record["outputs"]:
                link = _link(uri, out)
                page.append(
                    f"<figure><a href='{link}'><img loading='lazy' src='{link}' "
                    f"alt='{html.escape(record['id'], quote=True)}'></a><figcaption>"
                    f"<div class='id'>{html.escape(record['id'])}</div>"
                    f"<div class='prompt'>{html.escape(prompt[:300])}</div></figcaption></figure>"
                )
        page.append("</div></section>")
    if failed:
        page.append("<section><h2>Failed rows</h2><table><tr><th>id</th><th>spec</th><th>reason</th></tr>")
        for record in failed:
            page.append(
                f"<tr><td>{html.escape(record['id'])}</td><td>{html.escape(str(record['spec']))}</td>"
                f"<td>{html.escape(str(record['error']))}</td></tr>"
            )
        page.append("</table></section>")
    page.append("</body></html>")
    return "\n".join(page)


def write_gallery(storage: Storage, out: str, records: list[dict], contact_sheet: str | None = None) -> str:
    """Write ``<out>/index.html``; ``contact_sheet`` is the sheet's URI, linked when there is one."""
    uri = join(out, "index.html")
    sheet = contact_sheet.rsplit("/", 1)[-1] if contact_sheet else None
    storage.write_atomic(uri, render_gallery(records, out, contact_sheet=sheet).encode("utf-8"))
    return uri
