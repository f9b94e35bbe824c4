"""Reading a metadata part's schema is bounded like every request for ipaflow's own files: a store that accepts
connections and never answers (a real HTTP server on loopback, silent) counts as unreachable, and the read gives
up with StorageUnreachable after $IPAFLOW_OUTAGE_TIMEOUT instead of waiting on it; a readable part gives its
schema from the file's tail."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3 import HostileServer

from ipaflow.core import outages
from ipaflow.core.deadlines import Timeouts
from ipaflow.core.outages import StorageUnreachable
from ipaflow.core.storage import Storage
from ipaflow.tasks.metadata import FOOTER_BYTES, MetadataStore


def test_a_parts_schema_from_a_silent_store_gives_up_in_bounded_time():
    server = HostileServer()
    options = {"s3": {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": server.url}}}
    storage = Storage(options=options, backoff_s=0.05, timeouts=Timeouts(connect=1, read=1, call=1, outage=2))
    started = time.monotonic()
    try:
        with pytest.raises(StorageUnreachable):
            MetadataStore(storage, "s3://silent/r").schemas(["s3://silent/r/metadata/part-0.parquet"])
    finally:
        server.close()
        outages._outages.pop("s3://silent", None)  # this process's record of the store, for later tests
    assert time.monotonic() - started < 8


def test_a_parts_schema_is_read_from_its_tail_whatever_its_footers_size(tmp_path):
    small = pa.table({"id": ["a"], "status": ["ok"]})
    wide = pa.table({f"column_{i:04d}_{'x' * 40}": [i] for i in range(1500)})  # a footer over FOOTER_BYTES
    for name, table in (("small", small), ("wide", wide)):
        pq.write_table(table, tmp_path / f"{name}.parquet")
    assert pq.ParquetFile(tmp_path / "wide.parquet").metadata.serialized_size > FOOTER_BYTES
    schemas = MetadataStore(Storage(), str(tmp_path)).schemas([str(tmp_path / "small.parquet"),
                                                               str(tmp_path / "wide.parquet"),
                                                               str(tmp_path / "gone.parquet")])
    assert schemas == [small.schema, wide.schema, None]
