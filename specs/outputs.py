"""Where a row's outputs go: the one naming rule, used by the collision check, the writers, resume and the
gallery.

``files`` layout: ``images/<id>.<ext>``, or ``images/<id>-<k>.<ext>`` for k = 0.. when a row asks for several
images; video tasks write ``videos/<id>.gif``. Ids are checked before they get here (no separators, no
leading dot, no reserved names), so these paths never leave the output folder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ipaflow.specs.rows import Job
    from ipaflow.specs.spec import Spec

EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp", "gif": ".gif"}
# What ipaflow writes directly under ``--out`` (folders and files). A style folder that is ``--out``, or lies
# inside it, never takes its images from these: a re-run would otherwise read its own contact sheet or
# renders as style images, and render again every time (ipaflow.tasks.inputs.style_images).
OWN_ENTRIES = frozenset({"images", "videos", "metadata", "_ipaflow", "index.html", "contact-sheet.png"})


def output_stems(row_id: str, count: int) -> list[str]:
    """The file stem of each of a row's ``count`` outputs."""
    return [row_id] if count == 1 else [f"{row_id}-{k}" for k in range(count)]


def output_paths(job: Job, spec: Spec) -> list[str]:
    """The row's output paths relative to ``--out`` (a video task's rows have one output)."""
    ext = EXTENSIONS[spec.output_format]
    return [f"{spec.profile.folder}/{stem}{ext}" for stem in output_stems(job.id, job.num_images)]


def relative_to(uri: str, out: str) -> str:
    """An output URI as a path relative to the output folder (for links in the gallery)."""
    prefix = out.rstrip("/") + "/"
    return uri[len(prefix):] if uri.startswith(prefix) else uri.rsplit("/", 2)[-2] + "/" + uri.rsplit("/", 1)[-1]
