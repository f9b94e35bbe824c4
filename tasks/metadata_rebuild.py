"""Unreadable metadata set aside, and its records rebuilt from what the outputs carry.

A metadata file that cannot be read (a torn copy, a bad disk, a garbled tail) is in every reader's way: Arrow
reads ``metadata/`` as one dataset and fails on it. ``set_aside`` moves each such file (a part, a journal or an
update file) under ``_ipaflow/unreadable/``, kept there for inspection; the one WARNING is the reader's
(``MetadataStore.read_table``: it names the file and says what happens to it), the move is logged at INFO.
A Parquet file keeps its schema and row groups behind a footer at its end, so a file whose tail is torn has no
readable rows: its records are rebuilt instead.

``rebuild_records`` reads the outputs no current record names (``images/``, ``videos/`` in the file layouts, and
the samples of the container layouts) and rebuilds a record for each id whose outputs are all there: every
output embeds its row's parameters (``tasks.writers.embedded_params``: id, spec, seed, key, layout, the call's
parameters and the passthrough values; and its own ``ip_similarity``). The records are journaled like a
shard's, so the run folds them and rows whose outputs are intact are not rendered again. An id that still has a
record, an output whose parameters were shortened to fit (a JPEG's EXIF, ``truncated``), or an id missing one of
its outputs is left alone: that row renders again. Outputs are read one at a time: memory stays one output and the
records of one journal file.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import tarfile
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ipaflow.core.hashing import hash_strings, members
from ipaflow.core.storage import join
from ipaflow.specs.outputs import CONTAINERS, member_uri, output_stems, sample_key
from ipaflow.tasks.media import TRUNCATED, read_parameters
from ipaflow.tasks.metadata_scans import iter_listing
from ipaflow.tasks.metadata_schema import make_record, record_similarities
from ipaflow.tasks.owners import inside
from ipaflow.tasks.video import is_film

if TYPE_CHECKING:
    from ipaflow.tasks.metadata import MetadataStore

log = logging.getLogger("ipaflow.metadata")
UNREADABLE_DIR = "_ipaflow/unreadable"
FILE_FOLDERS = ("images", "videos")
# not call parameters: the row's identity, and each output's own score (tasks.scores.output_fields)
IDENTITY = ("id", "spec", "model", "seed", "key", "layout", "extra", "stem", TRUNCATED, "ip_similarity",
            "ip_similarities")
REBUILT_BATCH = 2048  # records per journal file


def set_aside(store: MetadataStore) -> list[str]:
    """Move every unreadable metadata file (parts, journal and update files) under ``_ipaflow/unreadable/``;
    returns where they went."""
    for uri in store.journal_files() + store.update_files():
        store.read_table(uri, ["id"])  # a journal is read whole only when folded: try each now
    moved = []
    for uri, reason in sorted(store.unreadable.items()):
        try:
            data = store.storage.read_bytes(uri)
        except FileNotFoundError:
            continue
        relative = uri[len(store.out.rstrip("/")) + 1:] if inside(uri, store.out) else posixpath.basename(uri)
        target = join(store.out, UNREADABLE_DIR, relative.replace("/", "--"))
        store.storage.write_atomic(target, data)
        store.storage.delete(uri)
        moved.append(target)
        log.info("metadata: moved %s to %s (%s)", store.storage.redact(uri), store.storage.redact(target),
                 store.storage.redact(reason))
    store.unreadable.clear()
    return moved


def current_hashes(store: MetadataStore) -> tuple[np.ndarray, np.ndarray]:
    """Sorted hashes of the ids with a current record and of every output URI they name: 8 bytes each."""
    ids, outputs = [], []
    for table in store.iter_current(["id", "outputs"]):
        ids.append(hash_strings(table.column("id")))
        outputs.append(hash_strings(pc.list_flatten(table.column("outputs").combine_chunks())))
    return tuple(np.unique(np.concatenate(found)) if found else np.zeros(0, np.uint64) for found in (ids, outputs))


def _outputs(store: MetadataStore, named: np.ndarray) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(uri, stem, embedded parameters) of every output whose URI's hash is not in ``named``."""
    storage, out = store.storage, store.out
    for relatives in iter_listing(storage, out, FILE_FOLDERS):
        uris = [join(out, relative) for relative in relatives]
        for keep, uri, relative in zip(~members(hash_strings(uris), named), uris, relatives):
            params = _parameters(storage, uri) if keep else None
            if params is not None:
                yield uri, posixpath.basename(relative).rsplit(".", 1)[0], params
    for layout, suffix in CONTAINERS.items():
        root = join(out, layout)
        for name in storage.list_files(root):
            if "/" in name or not name.endswith(suffix):
                continue
            container = join(root, name)
            for member, params, _ in container_samples(storage.read_bytes(container), layout):
                uri = member_uri(container, member)
                if not members(hash_strings([uri]), named)[0]:
                    yield uri, params.get("stem") or member.rsplit(".", 1)[0], params


def _parameters(storage, uri: str) -> dict[str, Any] | None:
    try:
        return embedded_parameters(storage.read_bytes(uri), uri)
    except Exception:  # noqa: BLE001 - not an output ipaflow wrote whole: nothing to rebuild from
        return None


def embedded_parameters(data: bytes, name: str) -> dict[str, Any]:
    """The parameters an output (named ``name``: a file, URI or container member) embeds, in any format."""
    if is_film(name):
        import av

        with av.open(io.BytesIO(data)) as container:
            tags = {key.lower(): value for key, value in container.metadata.items()}
        return json.loads(tags["comment"])
    return read_parameters(data)


def container_samples(data: bytes, layout: str) -> Iterator[tuple[str, dict[str, Any], bytes]]:
    """(member, parameters, output bytes) of each sample of a container; nothing more once it is damaged."""
    try:
        if layout == "webdataset":
            with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
                for name in [info.name for info in tar if info.isfile() and not info.name.endswith(".json")]:
                    info = json.loads(tar.extractfile(f"{name.split('.', 1)[0]}.json").read())
                    yield name, info, tar.extractfile(name).read()
        else:
            table = pq.read_table(io.BytesIO(data))
            media = table.column("video" if "video" in table.column_names else "image").combine_chunks()
            for path, blob, text in zip(media.field("path").to_pylist(), media.field("bytes").to_pylist(),
                                        table.column("json").to_pylist()):
                yield path, json.loads(text), blob
    except Exception:  # noqa: BLE001 - a damaged container: its samples render again
        return


def _record(row_id: str, found: list[tuple[str, str, dict]], run_id: str) -> dict | None:
    """The record of ``row_id`` from its outputs, or None unless they are exactly the outputs it wrote."""
    first = found[0][2]
    count = 1 if len(found) == 1 and found[0][1] == row_id else int(first.get("num_images") or 1)
    stems = {stem: uri for uri, stem, _ in found}
    carried = {stem: params for _, stem, params in found}
    wanted = [sample_key(stem) if "#" in found[0][0] else stem for stem in output_stems(row_id, count)]
    if sorted(stems) != sorted(wanted) or not first.get("key") or not first.get("spec"):
        return None
    if any(TRUNCATED in params or params.get("key") != first["key"] for _, _, params in found):
        return None
    params = {name: value for name, value in first.items() if name not in IDENTITY and name not in
              (first.get("extra") or {})}
    return make_record(job_id=row_id, spec=first["spec"], status="ok", run_id=run_id, seed=first.get("seed"),
                       outputs=[stems[stem] for stem in wanted], params=params, key=first["key"],
                       extra=first.get("extra") or {}, layout=first.get("layout") or "files",
                       ip_similarities=record_similarities([carried[stem] for stem in wanted]))


def rebuild_records(store: MetadataStore) -> int:
    """Journal a record for every id without one whose outputs are all in the folder (see the module
    docstring). Returns how many."""
    have, named = current_hashes(store)
    by_id: dict[str, list[tuple[str, str, dict]]] = {}
    for uri, stem, params in _outputs(store, named):
        row_id = params.get("id")
        if isinstance(row_id, str) and not members(hash_strings([row_id]), have)[0]:
            by_id.setdefault(row_id, []).append((uri, stem, params))
    run_id = f"rebuilt-{uuid.uuid4().hex[:8]}"
    records = [record for row_id in sorted(by_id) if (record := _record(row_id, by_id[row_id], run_id))]
    for start in range(0, len(records), REBUILT_BATCH):
        store.journal(run_id, f"{start // REBUILT_BATCH:05d}", records[start:start + REBUILT_BATCH])
    if records:
        log.info("metadata: rebuilt %d record(s) from their outputs", len(records))
    return len(records)
