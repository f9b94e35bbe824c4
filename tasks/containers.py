"""The container layouts: WebDataset tar shards and Parquet shards of image bytes, written whole or not at all.

A shard task fills one container at a time (``ContainerBuilder``), at most ``CONTAINER_SAMPLES`` outputs or
``CONTAINER_BYTES`` each, and publishes it with one atomic write before journaling the records that point into
it (``<container>#<member>``). One current sample per id: when a row is rendered again, the fold of the metadata
hands the superseded samples to ``drop_members``, which rewrites each container without them (deleted when
empty); containers no record points into (a shard attempt killed after its upload) are removed by
``drop_orphans``.

Tar members are written as img2dataset writes them: ``<key>.<ext>`` and ``<key>.json`` (the row's parameters),
with fixed metadata (mtime 0, root owner, mode 644) so the same rows give the same bytes; a video is
``<key>.gif``, ``<key>.mp4`` or ``<key>.webm``. Parquet shards carry the Hugging Face ``datasets`` feature
metadata, so ``load_dataset("parquet", ...)`` decodes the output: images (and GIFs, as before) in the ``image``
column, MP4 and WebM in a ``video`` column (a ``Video`` feature, decoded by torchcodec where it is installed),
each with its member name (``<key>.<ext>``) as ``path``. A container holds one spec's rows, so one of the two.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import tarfile
from collections import defaultdict

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

from ipaflow.core.storage import Storage
from ipaflow.specs.outputs import CONTAINERS, split_member
from ipaflow.tasks.video import is_film

log = logging.getLogger("ipaflow.containers")
CONTAINER_SAMPLES = 1000  # outputs per container (~1k samples, as WebDataset shards usually hold)
CONTAINER_BYTES = 256 << 20  # or this many bytes, whichever comes first: a container is built in memory
MEDIA_COLUMNS = {"image": "Image", "video": "Video"}  # the column holding a Parquet sample's output -> its feature


def parquet_schema(media: str) -> pa.Schema:
    """The schema of a Parquet container whose outputs are in column ``media`` (image or video)."""
    features = {"id": {"dtype": "string", "_type": "Value"}, "key": {"dtype": "string", "_type": "Value"},
                "spec": {"dtype": "string", "_type": "Value"}, "seed": {"dtype": "int64", "_type": "Value"},
                media: {"_type": MEDIA_COLUMNS[media]}, "json": {"dtype": "string", "_type": "Value"}}
    return pa.schema(
        [("id", pa.string()), ("key", pa.string()), ("spec", pa.string()), ("seed", pa.int64()),
         (media, pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("json", pa.string())],
        metadata={b"huggingface": json.dumps({"info": {"features": features}}).encode()},
    )


def media_column(member: str) -> str:
    """The Parquet column of an output: ``video`` for MP4 and WebM, ``image`` for what Pillow opens (GIF too)."""
    return "video" if is_film(member) else "image"


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info


class ContainerBuilder:
    """One container being filled: samples added from any thread, published once."""

    def __init__(self, layout: str):
        self.layout = layout
        self.samples = 0
        self.bytes = 0
        self._tar_buffer = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._tar_buffer, mode="w", format=tarfile.USTAR_FORMAT) \
            if layout == "webdataset" else None
        self._rows: list[dict] = []
        self._media: str | None = None  # the Parquet column of this container's outputs

    @property
    def full(self) -> bool:
        return self.samples >= CONTAINER_SAMPLES or self.bytes >= CONTAINER_BYTES

    def add(self, member: str, blob: bytes, info: dict) -> None:
        """One output: ``member`` is its name in the container (``<key>.<ext>``), ``info`` its parameters."""
        key = member.split(".", 1)[0]
        if self._tar is not None:
            text = json.dumps(info, sort_keys=True, ensure_ascii=False, default=str).encode()
            self._tar.addfile(_tar_info(member, len(blob)), io.BytesIO(blob))
            self._tar.addfile(_tar_info(f"{key}.json", len(text)), io.BytesIO(text))
        else:
            media = media_column(member)
            if self._media not in (None, media):
                raise ValueError(f"{member}: a Parquet container holds images or videos, not both")
            self._media = media
            self._rows.append({"id": info.get("id"), "key": info.get("key"), "spec": info.get("spec"),
                               "seed": info.get("seed"), media: {"bytes": blob, "path": member},
                               "json": json.dumps(info, sort_keys=True, ensure_ascii=False, default=str)})
        self.samples += 1
        self.bytes += len(blob)

    def payload(self) -> bytes:
        if self._tar is not None:
            self._tar.close()
            return self._tar_buffer.getvalue()
        buffer = io.BytesIO()
        schema = parquet_schema(self._media or "image")
        pq.write_table(pa.Table.from_pylist(self._rows, schema=schema), buffer, compression="zstd")
        return buffer.getvalue()


def _tar_without(data: bytes, keys: set[str]) -> tuple[bytes, int]:
    """The tar without the samples of ``keys``; and how many members are left."""
    out = io.BytesIO()
    left = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as source, \
            tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as target:
        for info in source:
            if not info.isfile() or info.name.split(".", 1)[0] in keys:
                continue
            target.addfile(_tar_info(info.name, info.size), source.extractfile(info))
            left += 1
    return out.getvalue(), left


def _parquet_without(data: bytes, members: set[str]) -> tuple[bytes, int]:
    table = pq.read_table(io.BytesIO(data))
    media = next(name for name in MEDIA_COLUMNS if name in table.column_names)
    paths = table.column(media).combine_chunks().field("path").to_pylist()
    kept = table.filter(pa.array([path not in members for path in paths]))
    buffer = io.BytesIO()
    pq.write_table(kept.replace_schema_metadata(parquet_schema(media).metadata), buffer, compression="zstd")
    return buffer.getvalue(), kept.num_rows


def drop_members(storage: Storage, uris: list[str]) -> int:
    """Remove the samples ``<container>#<member>`` from their containers (one rewrite per container, deleted
    when nothing is left). Returns how many containers changed."""
    by_container: dict[str, set[str]] = defaultdict(set)
    for uri in uris:
        container, member = split_member(uri)
        if member is not None:
            by_container[container].add(member)
    for container, names in by_container.items():
        try:
            data = storage.read_bytes(container)
        except FileNotFoundError:
            continue
        if container.endswith(CONTAINERS["webdataset"]):
            data, left = _tar_without(data, {name.split(".", 1)[0] for name in names})
        else:
            data, left = _parquet_without(data, names)
        if left:
            storage.write_atomic(container, data)
        else:
            storage.delete(container)
    return len(by_container)


def container_folders(out: str) -> dict[str, str]:
    return {layout: posixpath.join(out.rstrip("/"), layout) for layout in CONTAINERS}


def containers_of(table: pa.Table) -> set[str]:
    """The containers the records of ``table`` point into."""
    if "outputs" not in table.column_names:
        return set()
    flat = pa.compute.list_flatten(table.column("outputs").combine_chunks())
    inside = flat.filter(pa.compute.match_substring(flat, "#"))
    return {split_member(uri)[0] for uri in pa.compute.unique(pa.compute.replace_substring_regex(inside, "#[^#]*$", "")
                                                              ).to_pylist()} if len(inside) else set()


def drop_orphans(storage: Storage, out: str, referenced: set[str]) -> int:
    """Delete containers that no record points into: written by a shard attempt that was killed (or whose
    rows all failed to publish) before its records were journaled. Returns how many."""
    removed = 0
    for layout, folder in container_folders(out).items():
        for name in storage.list_files(folder):
            uri = posixpath.join(folder, name)
            if name.endswith(CONTAINERS[layout]) and "/" not in name and uri not in referenced:
                log.info("removing %s: no record points into it", storage.redact(uri))
                storage.delete(uri)
                removed += 1
    return removed
