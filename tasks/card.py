"""The dataset card: ``README.md`` at the root of an output folder, so that the folder describes itself.

Its YAML front matter is the form the Hugging Face hub (and ``datasets.load_dataset(OUT)``) reads: ``configs``,
one per kind of output present, each with its ``data_files``; the one with the most outputs is the default, so
``load_dataset(OUT)`` with no other argument loads it, and ``load_dataset(OUT, "<name>")`` any other. ``datasets``
infers one builder for all the configs of a folder, so a kind of output another builder reads (a folder holding
both image files and Parquet shards) is named under ``ipaflow.other_layouts`` with the call that loads it:

- ``images`` (the ``files`` and ``sharded`` layouts) and ``videos``: ``images/**`` or ``videos/**``, read by the
  image (or video) folder builder through ``metadata.parquet`` beside the outputs: one row per output of the
  current ``ok`` records (``file_name`` relative to the folder, ``id``, ``spec``, ``seed``, ``key``, ``prompt``,
  ``params`` as JSON text, and the output's own ``ip_similarity`` and ``ip_similarities``, per adapter), so the
  rows are the current records' outputs and nothing else;
- ``webdataset``: ``webdataset/*.tar``; ``parquet``: ``parquet/*.parquet`` (their samples carry the same
  fields themselves).

Then ``ipaflow``: the version that wrote the card, records by status, outputs per config, and the specs used.
The card is rewritten from one streamed pass over the current records (``write_card``, at the end of a run);
the metadata files are built in memory as zstd Parquet (tens of bytes per output) and written atomically.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from importlib.metadata import PackageNotFoundError, version

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from ipaflow.core.storage import Storage, join
from ipaflow.specs.outputs import CONTAINERS
from ipaflow.tasks.metadata import MetadataStore
from ipaflow.tasks.metadata_scans import FOLDER_METADATA
from ipaflow.tasks.metadata_schema import output_fields
from ipaflow.tasks.owners import inside
from ipaflow.tasks.video import is_film

CARD = "README.md"
FOLDERS = ("images", "videos")
COLUMNS = ["id", "status", "outputs", "spec", "seed", "key", "params", "ip_similarities"]
SCHEMA = pa.schema([("file_name", pa.string()), ("id", pa.string()), ("spec", pa.string()), ("seed", pa.int64()),
                    ("key", pa.string()), ("prompt", pa.string()), ("params", pa.string()),
                    ("ip_similarity", pa.float64()), ("ip_similarities", pa.list_(pa.float64()))])


def _version() -> str:
    try:
        return version("ipaflow")
    except PackageNotFoundError:
        return "unknown"


def _prompt(params: str | None) -> str | None:
    try:
        value = json.loads(params).get("prompt") if params else None
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


class _FolderMetadata:
    """One folder's metadata file, filled record table by record table."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        self.writer = pq.ParquetWriter(self.buffer, SCHEMA, compression="zstd")
        self.outputs = 0
        self.films = False  # MP4 or WebM among them: the video folder builder's

    def add(self, rows: list[dict]) -> None:
        if rows:
            self.films = self.films or any(is_film(row["file_name"]) for row in rows)
            self.writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMA))
            self.outputs += len(rows)

    def payload(self) -> bytes:
        self.writer.close()
        return self.buffer.getvalue()


def write_card(storage: Storage, out: str, store: MetadataStore | None = None) -> str:
    """Write ``README.md`` and the folder builders' metadata files from the current records; returns the
    card's URI."""
    store = store or MetadataStore(storage, out)
    root = out.rstrip("/")
    folders = {name: _FolderMetadata() for name in FOLDERS}
    statuses: Counter = Counter()
    containers: Counter = Counter()
    specs: set[str] = set()
    for table in store.iter_current(COLUMNS):
        rows: dict[str, list[dict]] = {name: [] for name in FOLDERS}
        for record in table.to_pylist():
            statuses[record["status"]] += 1
            if record["status"] != "ok":
                continue
            specs.add(record["spec"])
            fields = {"id": record["id"], "spec": record["spec"], "seed": record["seed"], "key": record["key"],
                      "prompt": _prompt(record["params"]), "params": record["params"]}
            scores = output_fields(record.get("ip_similarities"), len(record["outputs"] or []))
            for uri, score in zip(record["outputs"] or [], scores):
                if not inside(uri, root):
                    continue
                top, _, rest = uri[len(root) + 1:].partition("/")
                if "#" in rest:
                    containers[top] += 1
                elif top in rows:
                    rows[top].append({"file_name": rest, **fields, **score})
        for name, found in rows.items():
            folders[name].add(found)
    found = []  # (outputs, name, pattern, builder)
    for name, metadata in folders.items():
        uri = join(root, name, FOLDER_METADATA)
        if metadata.outputs:
            storage.write_atomic(uri, metadata.payload())
            found.append((metadata.outputs, name, f"{name}/**", "videofolder" if metadata.films else "imagefolder"))
        else:
            storage.delete(uri)
    found += [(containers[layout], layout, f"{layout}/*{suffix}", layout) for layout, suffix in CONTAINERS.items()
              if containers[layout]]
    default = max(found, default=None)
    configs, elsewhere = [], {}
    for _outputs, name, pattern, builder in found:
        if builder == default[3]:
            configs.append({"config_name": name, "data_files": [{"split": "train", "path": pattern}],
                            **({"default": True} if name == default[1] else {})})
        else:
            elsewhere[name] = {"builder": builder, "data_files": pattern}
    front = {"configs": configs, "ipaflow": {"version": _version(), "records": dict(sorted(statuses.items())),
                                             "outputs": {name: outputs for outputs, name, _, _ in found},
                                             "specs": sorted(specs), **({"other_layouts": elsewhere} if elsewhere else {})}}
    uri = join(root, CARD)
    storage.write_atomic(uri, _card(front).encode())
    return uri


def _card(front: dict) -> str:
    configs = [config["config_name"] for config in front["configs"]]
    shown = ", ".join(f"`{name}`" for name in configs) or "none yet"
    others = "".join(f"\n- `{name}`: `load_dataset(\"{where['builder']}\", data_files=\"<this folder>/{where['data_files']}\")`"
                     for name, where in front["ipaflow"].get("other_layouts", {}).items())
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + (
        "# ipaflow renders\n\n"
        "Rendered by ipaflow from a manifest; one record per row in `metadata/` "
        "(`pandas.read_parquet(\"metadata\")`).\n\n"
        f"Configs: {shown}. `datasets.load_dataset(\"<this folder>\")` loads the default (the one with the most "
        "outputs), `load_dataset(\"<this folder>\", \"<config>\")` another. Each output comes with its row's `id`, "
        "`spec`, `seed`, `key`, `prompt`, `params` and its `ip_similarity` (by the spec's image encoder, against the "
        "image prompt).\n"
        + (f"\nLayouts another builder reads (one folder's configs share one builder):{others}\n" if others else ""))
