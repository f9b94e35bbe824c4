"""Fetching and decoding a row's inputs: concurrent, deduplicated by URI, with errors that name the column."""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import PIL.Image

from ipaflow.core.problems import RowFailed
from ipaflow.core.storage import Storage
from ipaflow.specs.rows import Job
from ipaflow.specs.spec import Spec
from ipaflow.tasks.media import MediaError, decode_image


@dataclass
class RowInputs:
    images: dict[str, PIL.Image.Image] = field(default_factory=dict)  # the task profile's inputs, by column
    adapters: list[tuple[str, list[PIL.Image.Image]]] = field(default_factory=list)  # per adapter: (content key, images)
    ip_masks: list[PIL.Image.Image] | None = None


@dataclass
class _Fetched:
    image: PIL.Image.Image
    digest: str


class InputFetcher:
    """Fetches the inputs of a list of jobs in background threads.

    Each distinct URI is read and decoded once; a decoded image is dropped as soon as the last row that
    uses it has taken it, so memory follows the rows in flight, not the shard.
    """

    def __init__(self, storage: Storage, jobs: list[Job], specs: dict[str, Spec], threads: int = 8):
        self.storage = storage
        self.redact = storage.redact
        self.specs = specs
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ipaflow-fetch")
        self._lock = threading.Lock()
        self._files: dict[str, Future] = {}
        self._folders: dict[str, Future] = {}
        self._uses = Counter(uri for job in jobs for uri in self._uris(job))

    @staticmethod
    def _uris(job: Job) -> list[str]:
        uris = []
        for column, value in job.inputs.items():
            if column != "style_folder":
                uris.extend(value if isinstance(value, list) else [value])
        return uris

    def _read(self, uri: str) -> _Fetched:
        data = self.storage.read_bytes(uri)
        return _Fetched(decode_image(data), hashlib.sha256(data).hexdigest())

    def _file(self, uri: str) -> Future:
        with self._lock:
            if uri not in self._files:
                self._files[uri] = self._pool.submit(self._read, uri)
            return self._files[uri]

    def _release(self, uri: str) -> None:
        with self._lock:
            self._uses[uri] -= 1
            if self._uses[uri] <= 0:
                self._files.pop(uri, None)

    def _folder(self, uri: str) -> Future:
        with self._lock:
            if uri not in self._folders:
                self._folders[uri] = self._pool.submit(self._read_folder, uri)
            return self._folders[uri]

    def _read_folder(self, uri: str) -> tuple[str, list[PIL.Image.Image]]:
        names = [name for name, _ in self.storage.list_images(uri)]
        if not names:
            raise RowFailed.at("style_folder", f"no images in {self.redact(uri)}")
        futures = [self._pool.submit(self._read, name) for name in names]
        fetched = []
        for name, future in zip(names, futures):
            try:
                fetched.append(future.result())
            except MediaError as exc:
                raise RowFailed.at("style_folder", f"{self.redact(name)}: {exc}") from None
        digest = hashlib.sha256("".join(f.digest for f in fetched).encode()).hexdigest()
        return digest, [f.image for f in fetched]

    def _take(self, column: str, uri: str) -> _Fetched:
        try:
            return self._file(uri).result()
        except FileNotFoundError:
            raise RowFailed.at(column, f"not found: {self.redact(uri)}") from None
        except MediaError as exc:
            raise RowFailed.at(column, f"{self.redact(uri)}: {exc}") from None
        except RowFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - storage errors become the row's reason
            raise RowFailed.at(column, f"cannot read {self.redact(uri)}: {self.redact(exc)}") from None
        finally:
            self._release(uri)

    def prefetch(self, jobs: list[Job]) -> None:
        """Start reading the inputs of ``jobs`` now; ``get`` collects them later."""
        for job in jobs:
            for column, value in job.inputs.items():
                if column == "style_folder":
                    self._folder(value)
                else:
                    for uri in value if isinstance(value, list) else [value]:
                        self._file(uri)

    def get(self, job: Job) -> RowInputs:
        """The decoded inputs of ``job``; raises RowFailed naming the first column that failed."""
        spec = self.specs[job.spec]
        inputs = RowInputs()
        failure: RowFailed | None = None
        taken: dict[str, list[_Fetched]] = {}
        for column, value in job.inputs.items():
            if column == "style_folder":
                continue
            fetched = []
            for uri in value if isinstance(value, list) else [value]:
                try:
                    fetched.append(self._take(column, uri))
                except RowFailed as exc:
                    failure = failure or exc
            taken[column] = fetched
        if failure:
            raise failure
        for column in spec.profile.inputs:
            inputs.images[column] = taken[column][0].image
        if "ip_mask" in taken:
            inputs.ip_masks = [f.image for f in taken["ip_mask"]]
        for column in spec.image_columns:
            if column == "style_folder":
                try:
                    inputs.adapters.append(self._folder(job.inputs["style_folder"]).result())
                except RowFailed:
                    raise
                except FileNotFoundError:
                    raise RowFailed.at("style_folder", f"not found: {self.redact(job.inputs['style_folder'])}") from None
                except Exception as exc:  # noqa: BLE001
                    raise RowFailed.at("style_folder", f"cannot read: {self.redact(exc)}") from None
            else:
                files = taken[column]
                key = hashlib.sha256("".join(f.digest for f in files).encode()).hexdigest()
                inputs.adapters.append((key, [f.image for f in files]))
        return inputs

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
