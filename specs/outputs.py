"""Where a row's outputs go: the one naming rule, used by the collision check, the writers, resume and the
gallery.

A row writes one output per image, each named by a *stem*: the row's id, or ``<id>-<k>`` for k = 0.. when the
row asks for several images. Two rows may never write the same stem (``collision_key`` says when two stems are
the same: compared without case, Unicode-normalised; the collision check, the duplicate-id check and the
check of outputs owned by an earlier run's records all use it). Where a stem lands depends on the
layout (the spec's ``output.layout``, or ``render --layout``):

- ``files``: ``images/<stem>.<ext>`` (video tasks: ``videos/<stem>.gif``, ``.mp4`` or ``.webm``);
- ``sharded``: ``images/<hhh>/<stem>.<ext>``, ``hhh`` the first three hex digits of a hash of the stem, so
  4096 folders hold at most ~10k files each up to ~40M outputs;
- ``webdataset``: members ``<stem>.<ext>`` + ``<stem>.json`` of tar shards under ``webdataset/``;
- ``parquet``: rows (image bytes + parameters) of Parquet shards under ``parquet/``.

A container layout's record names each output as ``<container>#<member>``.

Records name their outputs relative to ``--out`` (``images/a.png``, ``webdataset/<container>.tar#a.png``), so a
folder copied or moved elsewhere (another disk, bucket or machine) is still the same dataset. An output's *name*
is its path from its layout's top folder (``images/``, ``videos/``, ``webdataset/``, ``parquet/``): a name read
from a record is itself, and an absolute URI an older record holds is read by its path from the last top folder
in it (``s3://old/run/images/a.png`` is ``images/a.png``), wherever the folder was when it was written.
Readers get URIs from names in one place, ``resolve_output`` (``resolve_outputs`` for a column of records).
Ids are checked before they get here (no separators, no leading dot, no reserved names), so these paths never
leave the output folder.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from ipaflow.specs.rows import Job
    from ipaflow.specs.spec import Spec

EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp", "gif": ".gif", "mp4": ".mp4", "webm": ".webm"}
# What ipaflow writes directly under ``--out`` (folders and files). A style folder that is ``--out``, or lies
# inside it, never takes its images from these: a re-run would otherwise read its own contact sheet or
# renders as style images, and render again every time (ipaflow.tasks.inputs.style_images).
OWN_ENTRIES = frozenset({"images", "videos", "metadata", "_ipaflow", "index.html", "contact-sheet.png"})
DEFAULT_LAYOUT = "files"
CONTAINERS = {"webdataset": ".tar", "parquet": ".parquet"}  # layout -> container file suffix, under <layout>/
SHARD_DIGITS = 3  # hex digits of the sharded layout's folder: 4096 folders


def collision_key(stem: str) -> str:
    """What makes two output stems (and so two ids) the same: equal once Unicode-normalised (NFC) and
    case-folded. macOS, Windows and SMB shares compare file names without case (and APFS without Unicode
    form), so ``A.png`` and ``a.png`` are one file there: two rows writing them would overwrite each other
    when a user syncs or renders there. Every check of duplicates and collisions goes through this function
    (the census, ``specs.rows``, outputs owned across runs in ``tasks.owners``)."""
    if stem.isascii():
        return stem.lower()  # ids are ASCII (specs.rows.ROW_ID_PATTERN): the common case needs no normalising
    return unicodedata.normalize("NFC", stem).casefold()


def collision_keys(stems: pa.Array) -> pa.Array:
    """``collision_key`` of every stem of an Arrow string array: one vectorised lower-casing when all are ASCII
    (ids always are), else stem by stem."""
    if not len(stems) or pc.all(pc.string_is_ascii(stems)).as_py() is not False:
        return pc.ascii_lower(stems)
    return pa.array([None if stem is None else collision_key(stem) for stem in stems.to_pylist()], type=pa.string())


def output_stems(row_id: str, count: int) -> list[str]:
    """The stem of each of a row's ``count`` outputs."""
    return [row_id] if count == 1 else [f"{row_id}-{k}" for k in range(count)]


def job_stems(job: Job, spec: Spec) -> list[str]:
    """A job's output stems (a video task's rows have one output)."""
    return output_stems(job.id, 1 if spec.profile.output == "video" else job.num_images)


def extension(spec: Spec) -> str:
    return EXTENSIONS[spec.output_format]


def shard_folder(stem: str) -> str:
    """The sharded layout's folder of a stem: stable across runs and machines. It hashes the stem itself, not
    its ``collision_key``, so outputs written before ids were compared without case keep their folders (two
    stems that differ only in case never both exist: the collision rules refuse the second)."""
    return hashlib.sha256(stem.encode()).hexdigest()[:SHARD_DIGITS]


def is_container(layout: str) -> bool:
    return layout in CONTAINERS


def output_paths(job: Job, spec: Spec, layout: str = DEFAULT_LAYOUT) -> list[str]:
    """The row's outputs relative to ``--out`` in a file layout, or its member names in a container layout."""
    ext = extension(spec)
    stems = job_stems(job, spec)
    if layout == "sharded":
        return [f"{spec.profile.folder}/{shard_folder(stem)}/{stem}{ext}" for stem in stems]
    if is_container(layout):
        return [f"{sample_key(stem)}{ext}" for stem in stems]
    return [f"{spec.profile.folder}/{stem}{ext}" for stem in stems]


def sample_key(stem: str) -> str:
    """A stem as a WebDataset sample key: readers (``webdataset``, Hugging Face ``datasets``) end a key at the
    first dot of a member's name, so dots are written ``%2E`` (``%`` is never in an id: one-to-one)."""
    return stem.replace(".", "%2E")


def member_uri(container: str, member: str) -> str:
    """How a record names an output inside a container (ids never hold '#')."""
    return f"{container}#{member}"


def split_member(uri: str) -> tuple[str, str | None]:
    """(container URI, member) of a container output; (uri, None) for a plain file."""
    container, _, member = uri.rpartition("#")
    return (container, member) if container and "/" not in member else (uri, None)


def layout_of(spec: Spec, chosen: str | None = None) -> str:
    """The layout a spec's rows are written in: ``render --layout`` when given, else the spec's own."""
    if chosen:
        return chosen
    return (spec.output.layout if spec.output is not None else None) or DEFAULT_LAYOUT


TOP_FOLDERS = ("images", "videos", *CONTAINERS)  # every layout's top folder under --out
# The path from the last top folder in a URI: greedy, so ``out/images/images/a.png`` (an --out under a folder
# named images) names ``images/a.png``. Stems hold no '/', sharded folders are 3 hex digits, members no '/'.
OUTPUT_NAME = "^(?:.*/)?((?:" + "|".join(TOP_FOLDERS) + ")/[^/].*)$"
_NAME = "^(?:" + "|".join(TOP_FOLDERS) + ")/[^/]"  # a name already (what records hold): itself
_OUTPUT_NAMED, _NAMED = re.compile(OUTPUT_NAME), re.compile(_NAME)


def output_name(uri: str) -> str | None:
    """An output's name relative to ``--out`` (see the module docstring), or None where ``uri`` lies in no
    layout's top folder (nothing ipaflow wrote)."""
    if _NAMED.match(uri):
        return uri
    found = _OUTPUT_NAMED.match(uri)
    return found.group(1) if found else None


def output_names(values: pa.Array) -> pa.Array:
    """``output_name`` of every value of a string array, null where there is none; vectorised, and only the
    absolute URIs of older records go through the longer pattern."""
    named = pc.fill_null(pc.match_substring_regex(values, _NAME), False)
    names = pc.if_else(named, values, pa.scalar(None, values.type))
    others = values.filter(pc.invert(named))
    if len(others):
        found = pc.fill_null(pc.match_substring_regex(others, OUTPUT_NAME), False)
        extracted = pc.if_else(found, pc.replace_substring_regex(others, OUTPUT_NAME, r"\1"),
                               pa.scalar(None, values.type))
        names = pc.replace_with_mask(names, pc.invert(named), extracted)
    return names


def resolve_output(out: str, name: str) -> str:
    """The URI of a record's output under ``out``: its name (``output_name``) joined to ``out``; a value that
    names no output is returned unchanged (never under ``out``, so nothing removes or rewrites it)."""
    relative = output_name(name)
    return name if relative is None else out.rstrip("/") + "/" + relative


def resolve_outputs(table: pa.Table, out: str) -> pa.Table:
    """``table`` with its ``outputs`` column resolved under ``out`` (``resolve_output``, vectorised)."""
    if "outputs" not in table.column_names or not table.num_rows:
        return table
    column = table.column("outputs").combine_chunks()
    flat = pc.list_flatten(column)
    names = output_names(flat)
    resolved = pc.if_else(pc.is_valid(names), pc.binary_join_element_wise(out.rstrip("/") + "/", names, ""), flat)
    offsets = pc.subtract(column.offsets, column.offsets[0])  # a sliced column's offsets start past 0
    rebuilt = pa.ListArray.from_arrays(offsets, resolved, type=column.type, mask=column.is_null())
    return table.set_column(table.column_names.index("outputs"), "outputs", rebuilt)


def relative_to(uri: str, out: str) -> str:
    """An output URI as a path relative to the output folder (for links in the gallery)."""
    prefix = out.rstrip("/") + "/"
    return uri[len(prefix):] if uri.startswith(prefix) else output_name(uri) or uri.rsplit("/", 1)[-1]
