"""Inputs over http(s)://: a style folder served as an index page keys by its files' content, and a server
that fails for a few requests is retried (a real http.server on 127.0.0.1, behind the fault proxy)."""

from __future__ import annotations

import pytest
from s3 import Fault, FaultProxy, StaticServer

from ipaflow.core.storage import Storage
from ipaflow.specs.registry import SpecRegistry
from ipaflow.specs.rows import resolve_rows
from ipaflow.tasks.keys import identify_inputs, row_key


@pytest.fixture
def served(tmp_path, inputs_dir):
    (tmp_path / "style").mkdir()
    for number in range(2):
        (tmp_path / "style" / f"img{number}.png").write_bytes((inputs_dir / "style" / f"img{number}.png").read_bytes())
    (tmp_path / "face.png").write_bytes((inputs_dir / "face.png").read_bytes())
    server = StaticServer(tmp_path)
    yield server, tmp_path
    server.close()


def test_http_style_folder_key_follows_its_files(served, inputs_dir):
    server, root = served
    registry = SpecRegistry()
    row = {"id": "a", "spec": "sdxl-multi-style-face", "style_folder": f"{server.url}/style/",
           "ip_image": f"{server.url}/face.png"}
    (job,), bad = resolve_rows([row], registry)
    assert not bad
    spec, storage = registry.get(job.spec), Storage()

    def key() -> str:
        return row_key(job, spec, identify_inputs(storage, [job]))

    first = key()
    assert key() == first
    new_picture = (inputs_dir / "style" / "img2.png").read_bytes()
    (root / "style" / "img1.png").write_bytes(new_picture)  # same name, other content
    assert key() != first


def test_http_input_faults_are_retried_and_missing_files_are_not(served):
    server, _ = served
    proxy = FaultProxy(server.url)
    try:
        proxy.faults = [Fault("GET", "/face.png", times=3, kinds=("503", "reset", "truncate"))]
        storage = Storage(backoff_s=0.01)
        assert storage.read_bytes(f"{proxy.endpoint}/face.png") == (served[1] / "face.png").read_bytes()
        assert proxy.count("GET", "/face.png") == 4
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(f"{proxy.endpoint}/nothing.png")
        assert proxy.count("GET", "/nothing.png") == 1
    finally:
        proxy.close()
