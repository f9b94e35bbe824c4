"""Every input read is bounded: what is not a regular file is refused after a stat (a FIFO never blocks), a
file's size is checked before it is read, reasons always say what happened, and the time limits are set the
documented ways. Local files only (the servers are in tests/e2e/test_hostile_inputs.py)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from ipaflow.core.deadlines import Timeouts
from ipaflow.core.input_reads import MAX_INPUT_BYTES, InputRefused, InputTimeout
from ipaflow.core.storage import Storage, describe_error


def _within(seconds: float, call):
    """``call()``'s result or exception, failing the test (instead of hanging it) past ``seconds``."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still blocked after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture
def odd_files(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    sparse = tmp_path / "three-gib.png"
    with open(sparse, "wb") as handle:  # 3 GiB on paper, no disk used
        handle.truncate(3 << 30)
    (tmp_path / "folder.png").mkdir()
    return {"fifo": fifo, "sparse": sparse, "folder": tmp_path / "folder.png", "missing": tmp_path / "missing.png"}


@pytest.mark.parametrize("read", ["read_input", "identity"])
def test_what_is_not_a_small_regular_file_is_refused_before_reading(odd_files, read):
    storage = Storage()
    cases = [
        (odd_files["fifo"], InputRefused, "not a regular file (a FIFO)"),
        ("/dev/zero", InputRefused, "not a regular file (a character device)"),
        (odd_files["sparse"], InputRefused, "too large: 3 GiB, more than the 256 MiB allowed"),
        (odd_files["folder"], IsADirectoryError, "is a folder, not a file"),
        (odd_files["missing"], FileNotFoundError, "not found"),
    ]
    for path, kind, reason in cases:
        started = time.monotonic()
        with pytest.raises(kind) as caught:
            _within(5, lambda path=path: getattr(storage, read)(str(path)))
        assert describe_error(caught.value) == reason
        assert time.monotonic() - started < 1, path  # refused from the stat: nothing was read


def test_small_files_read_whole_and_proc_files_too(tmp_path):
    storage = Storage()
    (tmp_path / "a.png").write_bytes(b"x" * 1000)
    assert bytes(storage.read_input(str(tmp_path / "a.png"))) == b"x" * 1000
    assert storage.identity(str(tmp_path / "a.png")) == storage.identity(f"file://{tmp_path}/a.png")
    environ = storage.read_input("/proc/self/environ")  # size 0 on paper: read up to the cap, not trusted
    assert 0 < len(environ) <= MAX_INPUT_BYTES
    with pytest.raises(InputRefused, match="too large: more than the 100 bytes allowed"):
        storage.read_input("/proc/self/environ", max_bytes=100)


def test_reasons_always_say_something():
    from fsspec.exceptions import FSTimeoutError

    for exc in (FSTimeoutError(), TimeoutError(), OSError(), ValueError(), ConnectionRefusedError(111, "")):
        assert describe_error(exc).strip(), repr(exc)
    assert describe_error(ConnectionRefusedError(111, "Connect call failed")) == "Connection refused"
    assert describe_error(FSTimeoutError()) == "timed out (no answer in time)"
    assert len(describe_error(ValueError("x" * 10_000))) < 400  # messages that quote a server's answer are cut


def test_timeouts_from_the_environment_and_fsspec_options(monkeypatch, caplog):
    monkeypatch.setenv("IPAFLOW_CONNECT_TIMEOUT", "2.5")
    monkeypatch.setenv("IPAFLOW_READ_TIMEOUT", "7")
    monkeypatch.setenv("IPAFLOW_INPUT_TIMEOUT", "soon")
    timeouts = Timeouts.from_environment()
    assert (timeouts.connect, timeouts.read, timeouts.input) == (2.5, 7.0, Timeouts().input)
    assert "ignoring IPAFLOW_INPUT_TIMEOUT='soon'" in caplog.text

    storage = Storage()
    http = storage.options_for("https")["client_kwargs"]["timeout"]
    assert (http.sock_connect, http.sock_read, http.total) == (2.5, 7.0, timeouts.input)
    assert storage.options_for("s3")["config_kwargs"] == {"connect_timeout": 2.5, "read_timeout": 7.0}

    own = Storage(options={"s3": {"config_kwargs": {"read_timeout": 99}},
                           "http": {"client_kwargs": {"timeout": {"sock_read": 3, "total": 4}}}})
    assert own.options_for("s3")["config_kwargs"] == {"connect_timeout": 2.5, "read_timeout": 99}
    assert own.options_for("http")["client_kwargs"]["timeout"].sock_read == 3  # JSON options: a dict


def test_spellings_of_one_local_file_share_one_name(tmp_path):
    storage = Storage()
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "x.png").write_bytes(b"x")
    (tmp_path / "link.png").symlink_to(tmp_path / "odd" / "x.png")
    spellings = [f"{tmp_path}/odd/x.png", f"{tmp_path}/./odd//x.png", f"{tmp_path}/odd/../odd/x.png",
                 f"file://{tmp_path}/odd/x.png", f"{tmp_path}/link.png"]
    assert len({storage.resolved(uri) for uri in spellings}) == 1
    assert storage.resolved("s3://b/a//b.png") != storage.resolved("s3://b/a/b.png")  # different objects


def test_style_folder_cap_and_own_outputs(tmp_path):
    from ipaflow.core.problems import RowFailed
    from ipaflow.tasks.inputs import MAX_STYLE_IMAGES, style_images

    storage = Storage()
    many = tmp_path / "many"
    many.mkdir()
    for number in range(MAX_STYLE_IMAGES + 1):
        (many / f"{number:03d}.png").write_bytes(b"x")
    with pytest.raises(RowFailed) as caught:
        style_images(storage, str(many))
    assert caught.value.column == "style_folder" and "holds 65 images; at most 64" in caught.value.reason

    out = tmp_path / "out"  # --out is also the style folder; ipaflow wrote a contact sheet and renders there
    (out / "images").mkdir(parents=True)
    for name in ("style.png", "contact-sheet.png", "images/row.png"):
        (out / name).write_bytes(b"x")
    assert [os.path.basename(uri) for uri, _ in style_images(storage, str(out), out=str(out))] == ["style.png"]
    assert len(style_images(storage, str(out))) == 2  # without --out (validate), the folder as it is
    with pytest.raises(RowFailed, match=r"no images in .*/out/images \(besides ipaflow's own outputs: 1\)"):
        style_images(storage, str(out / "images"), out=str(out))


def test_a_slow_read_without_async_support_times_out_and_never_returns_a_part(monkeypatch):
    """Filesystems without async support (sftp, ftp, memory) are read chunk by chunk: one that reads slower
    than the input time limit is a timeout, never the first part of the file as if it were whole."""
    from fsspec.implementations.memory import MemoryFileSystem

    monkeypatch.setenv("IPAFLOW_INPUT_TIMEOUT", "0.5")
    MemoryFileSystem().pipe("/ipaflow-slow/three-mib.bin", b"x" * (3 << 20))
    real_open = MemoryFileSystem._open

    def slow_open(self, path, mode="rb", **kwargs):
        handle = real_open(self, path, mode, **kwargs)
        read = handle.read
        handle.read = lambda size=-1: (time.sleep(0.3), read(size))[1]
        return handle

    monkeypatch.setattr(MemoryFileSystem, "_open", slow_open)
    with pytest.raises(InputTimeout):
        Storage().read_input("memory://ipaflow-slow/three-mib.bin")
