"""Pictures of a run, to judge it at a glance: ``<out>/contact-sheet.png`` (the first outputs by row id, for any
image viewer or bucket browser) and, per spec, a small JPEG sheet embedded in the run summary as a ``data:``
URI (the Prefect UI shows those, but cannot load local paths or ``s3://`` URLs). Every thumbnail is labelled
with its row id. Outputs are read through the run's storage, so both work for local and object-store outputs.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ipaflow.core.storage import Storage, join

SHEET_IMAGES = 64  # the first outputs by id
SHEET_CELL = 128  # pixels per thumbnail
SHEET_COLUMNS = 8
PREVIEW_IMAGES = 8  # per spec
PREVIEW_BUDGET = 96_000  # bytes of JPEG for all specs together (base64 adds a third)
PREVIEW_MIN_BYTES = 8_000  # per spec, however many specs
# (cell pixels, JPEG quality), tried in order until a spec's sheet fits its share of the budget
PREVIEW_LADDER = ((96, 80), (96, 60), (80, 50), (64, 50), (64, 35), (48, 35))
LABEL_PIXELS = 13


@dataclass(frozen=True)
class Thumb:
    label: str  # the row id (with the image's number when a row has several)
    spec: str
    image: object  # PIL.Image.Image, at most SHEET_CELL pixels a side


def _chosen(records: list[dict]) -> tuple[list[tuple[str, str, str]], dict[str, list[tuple[str, str, str]]]]:
    """(label, spec, uri) of the outputs on the contact sheet, and of each spec's preview."""
    items = []
    for record in sorted((r for r in records if r["status"] == "ok"), key=lambda r: r["id"]):
        outputs = list(record["outputs"])
        for number, uri in enumerate(outputs):
            label = record["id"] if len(outputs) == 1 else f"{record['id']} [{number}]"
            items.append((label, record["spec"], uri))
    per_spec: dict[str, list[tuple[str, str, str]]] = {}
    for item in items:
        chosen = per_spec.setdefault(item[1], [])
        if len(chosen) < PREVIEW_IMAGES:
            chosen.append(item)
    return items[:SHEET_IMAGES], per_spec


def read_thumbnails(storage: Storage, records: list[dict], warn: Callable[[str], None]) -> tuple[list[Thumb],
                                                                                                dict[str, list[Thumb]]]:
    """Thumbnails of the contact sheet's outputs and of each spec's preview; each output is read once, in
    parallel (remote reads overlap). An unreadable output is left out, with a warning."""
    import PIL.ImageOps

    from ipaflow.tasks.video import first_frame

    sheet_items, per_spec_items = _chosen(records)
    uris = list(dict.fromkeys(uri for _, _, uri in sheet_items + [i for v in per_spec_items.values() for i in v]))

    def thumbnail(uri: str):
        try:
            return PIL.ImageOps.contain(first_frame(storage.read_bytes(uri), uri), (SHEET_CELL, SHEET_CELL))
        except Exception as exc:  # noqa: BLE001 - one unreadable output must not cost the previews
            warn(f"preview: skipping {storage.redact(uri)}: {storage.redact(exc)}")
            return None

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="ipaflow-preview") as pool:
        images = dict(zip(uris, pool.map(thumbnail, uris)))

    def thumbs(items):
        return [Thumb(label, spec, images[uri]) for label, spec, uri in items if images[uri] is not None]

    return thumbs(sheet_items), {spec: found for spec, items in per_spec_items.items() if (found := thumbs(items))}


def labelled_grid(thumbs: list[Thumb], cell: int, columns: int):
    """The thumbnails in a grid of ``cell``-pixel squares, each with its label underneath (cut to fit)."""
    import PIL.Image
    import PIL.ImageDraw
    import PIL.ImageFont

    font = PIL.ImageFont.load_default()
    columns = max(1, min(columns, len(thumbs)))
    height = cell + LABEL_PIXELS
    sheet = PIL.Image.new("RGB", (columns * cell, math.ceil(len(thumbs) / columns) * height), "white")
    draw = PIL.ImageDraw.Draw(sheet)
    for number, thumb in enumerate(thumbs):
        row, column = divmod(number, columns)
        image = thumb.image
        if max(image.size) > cell:
            import PIL.ImageOps

            image = PIL.ImageOps.contain(image, (cell, cell))
        x, y = column * cell, row * height
        sheet.paste(image, (x + (cell - image.width) // 2, y + (cell - image.height) // 2))
        label = thumb.label
        while len(label) > 1 and draw.textlength(label, font=font) > cell - 4:
            label = label[:-2] + "…"
        draw.text((x + 2, y + cell), label, fill="black", font=font)
    return sheet


def write_contact_sheet(storage: Storage, out: str, thumbs: list[Thumb]) -> str | None:
    """``<out>/contact-sheet.png``; None when nothing is rendered."""
    if not thumbs:
        return None
    buffer = io.BytesIO()
    labelled_grid(thumbs, SHEET_CELL, SHEET_COLUMNS).save(buffer, format="PNG")
    uri = join(out, "contact-sheet.png")
    storage.write_atomic(uri, buffer.getvalue())
    return uri


def preview_jpeg(thumbs: list[Thumb], budget: int) -> bytes:
    """A spec's preview sheet as JPEG, at the largest (cell, quality) of the ladder that fits ``budget``; at
    the ladder's end, with fewer thumbnails until it fits (noise compresses badly)."""

    def encode(chosen: list[Thumb], cell: int, quality: int) -> bytes:
        buffer = io.BytesIO()
        labelled_grid(chosen, cell, columns=len(chosen)).save(buffer, format="JPEG", quality=quality, optimize=True)
        return buffer.getvalue()

    for cell, quality in PREVIEW_LADDER:
        data = encode(thumbs, cell, quality)
        if len(data) <= budget:
            return data
    while len(data) > budget and len(thumbs) > 1:
        thumbs = thumbs[:-1]
        data = encode(thumbs, cell, quality)
    return data


def preview_uris(per_spec: dict[str, list[Thumb]]) -> dict[str, str]:
    """Spec name -> ``data:image/jpeg;base64,...`` of its preview sheet, all of them within PREVIEW_BUDGET."""
    if not per_spec:
        return {}
    budget = max(PREVIEW_MIN_BYTES, PREVIEW_BUDGET // len(per_spec))
    return {spec: "data:image/jpeg;base64," + base64.b64encode(preview_jpeg(thumbs, budget)).decode("ascii")
            for spec, thumbs in sorted(per_spec.items())}
