"""Writing a shard's results: outputs encoded and uploaded in background threads while the model computes,
then their records journaled; a record is journaled only after every output it names exists."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

from ipaflow.core.problems import FailedRow, Problem, describe_exception
from ipaflow.core.storage import Storage, join
from ipaflow.specs.outputs import output_paths
from ipaflow.specs.rows import Job
from ipaflow.specs.spec import Spec
from ipaflow.tasks.media import encode_gif, encode_image
from ipaflow.tasks.metadata import MetadataStore, make_record
from ipaflow.tasks.render import Rendered


def embedded_params(job: Job, spec: Spec) -> dict:
    """What an output file carries about itself."""
    return {"id": job.id, "spec": spec.name, "model": spec.model, "seed": job.seed, **job.params}


class ShardWriter:
    """Encodes and uploads outputs off the render thread and journals the finished records."""

    def __init__(self, storage: Storage, out: str, run_id: str, shard: str, spec: Spec, keys: dict[str, str],
                 threads: int = 4, flush_every_s: float = 10.0, max_pending: int = 64):
        self.storage, self.out, self.run_id, self.shard, self.spec, self.keys = storage, out, run_id, shard, spec, keys
        self.metadata = MetadataStore(storage, out)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ipaflow-write")
        self._pending: list[Future] = []
        self._ready: list[dict] = []
        self._lock = threading.Lock()
        self._parts = 0
        self._attempt = uuid.uuid4().hex[:8]  # a retried shard task must not overwrite its earlier journal files
        self._last_flush = time.monotonic()
        self.flush_every_s = flush_every_s
        self._slots = threading.BoundedSemaphore(max_pending)
        self.ok = self.failed = self.images = 0
        self.failures: list[FailedRow] = []

    def _record(self, job: Job, status: str, **fields) -> dict:
        return make_record(job_id=job.id, spec=job.spec, status=status, run_id=self.run_id, seed=job.seed,
                           params=job.params, key=self.keys.get(job.id), extra=job.extra,
                           redact=self.storage.redact, **fields)

    def _write(self, rendered: Rendered) -> dict:
        job, spec = rendered.job, self.spec
        params = embedded_params(job, spec)
        paths = output_paths(job, spec)
        if spec.profile.output == "video":
            blobs = [encode_gif(rendered.images, spec.output.fps if spec.output else 8, params)]
        else:
            quality = spec.output.quality if spec.output else 95
            blobs = [encode_image(image, spec.output_format, params, quality) for image in rendered.images]
        uris = [join(self.out, path) for path in paths]
        for uri, blob in zip(uris, blobs):
            self.storage.write_atomic(uri, blob)
        return self._record(job, "ok", outputs=uris, elapsed_s=rendered.seconds, batch_size=rendered.batch_size)

    def _done(self, future: Future, job: Job) -> None:
        self._slots.release()
        try:
            record = future.result()
        except Exception as exc:  # noqa: BLE001 - an upload that failed after retries fails its row
            self.fail(job, describe_exception("write", exc, self.storage.redact))
            return
        with self._lock:
            self._ready.append(record)
            self.ok += 1
            self.images += len(record["outputs"])

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
            self.failed += 1
            self.failures.append(failed)

    def flush(self, force: bool = False) -> None:
        """Journal the records whose outputs are written (at most every ``flush_every_s`` unless forced)."""
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
        for future in self._pending:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - already turned into a failed record by _done
                pass
        self._pool.shutdown(wait=True)
        self.flush(force=True)
