"""The input fetcher bounds what a row may decode and what it holds: one read and one decode per distinct input
however it is spelled, a row's pixel budget and an image prompt's size checked from the headers (nothing
decoded), and decoded images held ahead of the caller kept within the fetcher's pixel budget."""

from __future__ import annotations

import threading
import time

import PIL.Image
import pytest
from util import header_only_png

from ipaflow.core.problems import RowFailed
from ipaflow.core.storage import Storage
from ipaflow.specs.registry import SpecRegistry
from ipaflow.specs.rows import resolve_rows
from ipaflow.tasks import inputs as inputs_module
from ipaflow.tasks.inputs import InputFetcher


class CountingStorage(Storage):
    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def read_input(self, uri, max_bytes=None):
        self.reads.append(uri)
        return super().read_input(uri, max_bytes) if max_bytes else super().read_input(uri)


def _fetcher(rows, storage=None):
    registry = SpecRegistry()
    jobs, bad = resolve_rows(rows, registry)
    assert not bad, bad
    specs = {job.spec: registry.get(job.spec) for job in jobs}
    return InputFetcher(storage or Storage(), jobs, specs), jobs


def test_one_read_and_one_decode_per_distinct_input(tmp_path):
    (tmp_path / "odd").mkdir()
    PIL.Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "odd" / "x.png")
    (tmp_path / "copy.png").write_bytes((tmp_path / "odd" / "x.png").read_bytes())  # same content, other file
    ways = ["odd/x.png", "./odd/x.png", "odd//x.png", "odd/../odd/x.png", f"{tmp_path}/odd/x.png", "./odd/./x.png",
            "odd/./x.png", "copy.png"]
    rows = [{"id": "r", "spec": "sdxl-text2img", "ip_image": [f"{tmp_path}/{w}" if not w.startswith("/") else w
                                                               for w in ways]}]
    storage = CountingStorage()
    fetcher, (job,) = _fetcher(rows, storage)
    try:
        fetched = fetcher.get(job)
    finally:
        fetcher.close()
    images = fetched.adapters[0][1]
    assert len(images) == 8 and len({id(image) for image in images}) == 1  # one decode, shared
    assert len(storage.reads) == 2  # x.png once (seven spellings), copy.png once
    assert fetcher.pixels.held == 64 * 48  # the one decoded image, alive while ``fetched`` holds it
    del fetched, images
    assert fetcher.pixels.held == 0


def test_pixel_budgets_are_checked_from_the_headers(tmp_path):
    (tmp_path / "init.png").write_bytes(header_only_png(8191, 8191))  # no pixels: decoding it would fail
    (tmp_path / "prompt.png").write_bytes(header_only_png(4096, 4096))
    rows = [
        {"id": "row-budget", "spec": "sdxl-img2img", "image": str(tmp_path / "init.png"),
         "ip_image": str(tmp_path / "prompt.png")},
        {"id": "prompt-size", "spec": "sdxl-text2img", "ip_image": str(tmp_path / "init.png")},
    ]
    fetcher, jobs = _fetcher(rows)
    problems = {}
    for job in jobs:
        with pytest.raises(RowFailed) as caught:
            fetcher.get(job)
        problems[job.id] = str(caught.value)
    fetcher.close()
    assert problems["row-budget"] == (
        "image: too large: the row's images hold 83869697 pixels in all (image: 1 image(s) of 67092481 pixels, "
        "ip_image: 1 image(s) of 16777216 pixels), more than the 67108864 a row may use")
    assert problems["prompt-size"] == (
        f"ip_image: {tmp_path}/init.png: too large for an image prompt: an image of 8191x8191 pixels, more than "
        "the 16777216 an IP-Adapter image may have (its encoder sees it at 224x224: downscale it)")


def test_decoded_pixels_held_ahead_stay_within_the_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs_module, "PIXELS_AHEAD", 3 * 64 * 64)
    rows = []
    for number in range(12):
        PIL.Image.new("RGB", (64, 64), (number * 20, 0, 0)).save(tmp_path / f"{number}.png")
        rows.append({"id": f"r{number}", "spec": "sdxl-text2img", "ip_image": str(tmp_path / f"{number}.png")})
    fetcher, jobs = _fetcher(rows)
    fetcher.prefetch(jobs)
    time.sleep(1.0)  # decode threads run ahead as far as the budget lets them
    assert fetcher.pixels.held <= 3 * 64 * 64

    parts = []
    failed = []

    def consume():
        for part in fetcher.take(jobs, lambda job, exc: failed.append(job.id)):
            parts.append(len(part))
            assert fetcher.pixels.held <= 4 * 64 * 64  # the budget, plus the row the caller waited for
            del part

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    worker.join(30)
    fetcher.close()
    assert not worker.is_alive(), "the fetcher waited forever"
    assert not failed and sum(parts) == 12 and max(parts) == 3


def test_images_later_rows_use_are_kept_unless_room_is_needed(tmp_path, monkeypatch):
    decodes = []
    original = inputs_module.decode_image
    monkeypatch.setattr(inputs_module, "decode_image", lambda data: decodes.append(1) or original(data))
    rows = []
    for number in range(4):
        PIL.Image.new("RGB", (64, 64), (number * 50, 0, 0)).save(tmp_path / f"{number}.png")
    rows = [{"id": f"r{i}", "spec": "sdxl-text2img", "ip_image": str(tmp_path / f"{i % 4}.png")} for i in range(24)]

    def fetch_all() -> None:
        fetcher, jobs = _fetcher(rows)
        for start in range(0, len(jobs), 4):  # as the worker does: a window at a time, images let go after it
            window = jobs[start:start + 4]
            fetcher.prefetch(window)
            ready = [fetcher.get(job) for job in window]
            del ready
        fetcher.close()

    fetch_all()
    assert len(decodes) == 4  # each shared image decoded once for all 24 rows
    decodes.clear()
    monkeypatch.setattr(inputs_module, "PIXELS_AHEAD", 64 * 64)  # room for one image: kept ones must go
    fetch_all()
    assert 4 < len(decodes) <= 24
