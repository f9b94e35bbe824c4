"""Writing a shard's results: outputs encoded and uploaded in background threads while the model computes,
then their records journaled; a record is journaled only after every output it names exists.

File layouts (``files``, ``sharded``) write each output as its own atomic file. Container layouts
(``webdataset``, ``parquet``) add outputs to the shard's current container (``tasks.containers``) and journal
their records once that container is published, whole.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

from ipaflow.core.problems import FailedRow, Problem, describe_exception
from ipaflow.core.storage import Storage, join
from ipaflow.specs.outputs import CONTAINERS, DEFAULT_LAYOUT, is_container, member_uri, output_paths
from ipaflow.specs.rows import Job
from ipaflow.specs.spec import Spec
from ipaflow.tasks.containers import ContainerBuilder
from ipaflow.tasks.counts import RowCounts
from ipaflow.tasks.media import encode_image
from ipaflow.tasks.metadata import MetadataStore
from ipaflow.tasks.metadata_schema import make_record, output_fields
from ipaflow.tasks.render import Rendered
from ipaflow.tasks.video import encode_video


def embedded_params(job: Job, spec: Spec, key: str | None, layout: str) -> dict:
    """What an output file carries about itself: everything its record holds but the run's own fields, so a
    record whose metadata part was lost is rebuilt from it (``tasks.metadata_rebuild``); the passthrough values
    under ``extra``."""
    identity = {"id": job.id, "spec": spec.name, "model": spec.model, "seed": job.seed, "key": key, "layout": layout}
    return {**identity, **job.params, **({"extra": job.extra} if job.extra else {})}


class ShardWriter:
    """Encodes and uploads outputs off the render thread and journals the finished records."""

    def __init__(self, storage: Storage, out: str, run_id: str, shard: str, spec: Spec, keys: dict[str, str],
                 threads: int = 4, flush_every_s: float = 10.0, max_pending: int = 64, layout: str = DEFAULT_LAYOUT,
                 manifests: dict[str, str] | None = None):
        self.storage, self.out, self.run_id, self.shard, self.spec, self.keys = storage, out, run_id, shard, spec, keys
        self.layout = layout
        self.manifests = manifests or {}  # id -> the manifest file the row came from
        self.metadata = MetadataStore(storage, out)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ipaflow-write")
        self._pending: list[Future] = []
        self._ready: list[dict] = []
        self._held: list[dict] = []  # records whose container is not published yet
        self._lock = threading.Lock()
        self._parts = 0
        self._attempt = uuid.uuid4().hex[:8]  # a retried shard task must not overwrite its earlier journal files
        self._last_flush = time.monotonic()
        self.flush_every_s = flush_every_s
        self._slots = threading.BoundedSemaphore(max_pending)
        self._containers = 0
        self._container = self._new_container()
        self.counts = RowCounts()  # rows written ok, failed; images written
        self.failures: list[FailedRow] = []

    def _new_container(self) -> tuple[str, ContainerBuilder] | None:
        if not is_container(self.layout):
            return None
        name = f"{self.run_id}-{self.shard}-{self._attempt}-{self._containers:04d}{CONTAINERS[self.layout]}"
        self._containers += 1
        return join(self.out, self.layout, name), ContainerBuilder(self.layout)

    def _record(self, job: Job, status: str, **fields) -> dict:
        return make_record(job_id=job.id, spec=job.spec, status=status, run_id=self.run_id, seed=job.seed,
                           params=job.params, key=self.keys.get(job.id), extra=job.extra,
                           redact=self.storage.redact, layout=self.layout, manifest=self.manifests.get(job.id), **fields)

    def _write(self, rendered: Rendered) -> dict:
        job, spec = rendered.job, self.spec
        params = embedded_params(job, spec, self.keys.get(job.id), self.layout)
        paths = output_paths(job, spec, self.layout)
        scores = output_fields(rendered.similarities, len(paths))  # each output's own ip_similarity
        if spec.profile.output == "video":
            blobs = [encode_video(rendered.images, spec.output_format, spec.output.fps if spec.output else 8,
                                  {**params, **scores[0]})]
        else:
            quality = spec.output.quality if spec.output else 95
            blobs = [encode_image(image, spec.output_format, {**params, **score}, quality)
                     for image, score in zip(rendered.images, scores)]
        if self._container is not None:
            info = {**params, **{k: v for k, v in job.extra.items() if k not in params}}
            with self._lock:
                uri, builder = self._container
                for path, blob, score in zip(paths, blobs, scores):
                    builder.add(path, blob, {**info, **score, "stem": path.rsplit(".", 1)[0]})
                uris = [member_uri(uri, path) for path in paths]
        else:
            uris = [join(self.out, path) for path in paths]
            for uri, blob in zip(uris, blobs):
                self.storage.write_atomic(uri, blob)
        return self._record(job, "ok", outputs=uris, elapsed_s=rendered.seconds, batch_size=rendered.batch_size,
                            ip_similarities=rendered.similarities)

    def _done(self, future: Future, job: Job) -> None:
        self._slots.release()
        try:
            record = future.result()
        except Exception as exc:  # noqa: BLE001 - an upload that failed after retries fails its row
            self.fail(job, describe_exception("write", exc, self.storage.redact))
            return
        with self._lock:
            (self._held if self._container is not None else self._ready).append(record)
            self.counts.ok += 1
            self.counts.images += len(record["outputs"])

    def submit(self, rendered: Rendered) -> None:
        """Queue a rendered row (or a failed one) for writing; blocks when too many are in flight."""
        if rendered.problem is not None:
            self.fail(rendered.job, rendered.problem)
            return
        self._slots.acquire()
        future = self._pool.submit(self._write, rendered)
        future.add_done_callback(lambda f, job=rendered.job: self._done(f, job))
        self._pending.append(future)

    def fail(self, job: Job, *problems: Problem) -> None:
        failed = FailedRow(row=job.id, problems=problems, index=job.index, spec=job.spec)
        record = self._record(job, "failed", error=failed.error)
        with self._lock:
            self._ready.append(record)
            self.counts.failed += 1
            self.failures.append(failed)

    def _wait(self) -> None:
        for future in self._pending:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - already turned into a failed record by _done
                pass
        self._pending = []

    def _publish(self) -> None:
        """Upload the current container whole, then release its records to the journal."""
        self._wait()
        uri, builder = self._container
        with self._lock:
            held, self._held = self._held, []
        if builder.samples:
            try:
                self.storage.write_atomic(uri, builder.payload())
            except Exception as exc:  # noqa: BLE001 - the container's rows fail, with the reason
                problem = describe_exception("write", exc, self.storage.redact)
                for record in held:
                    self.counts.ok -= 1
                    self.counts.images -= len(record["outputs"])
                    self.counts.failed += 1
                    self.failures.append(FailedRow(row=record["id"], problems=(problem,), spec=record["spec"]))
                    record.update(status="failed", error=str(problem), outputs=[])
        with self._lock:
            self._ready.extend(held)
        self._container = self._new_container()

    def flush(self, force: bool = False) -> None:
        """Journal the records whose outputs are written (at most every ``flush_every_s`` unless forced); a
        container layout publishes its container first when it is full (or when forced)."""
        if self._container is not None and (force or self._container[1].full):
            self._publish()
        if not force and time.monotonic() - self._last_flush < self.flush_every_s:
            return
        with self._lock:
            records, self._ready = self._ready, []
        if records:
            self.metadata.journal(self.run_id, f"{self.shard}-{self._attempt}-{self._parts:05d}", records)
            self._parts += 1
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Wait for every upload, then journal what is left."""
        self._wait()
        self._pool.shutdown(wait=True)
        self.flush(force=True)
