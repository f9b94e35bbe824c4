"""Out of GPU memory: a batch is split in halves and retried before any row fails; a row that runs out of
memory alone fails with a readable reason while the others render. There is no GPU here, so the loaded
pipeline raises torch.OutOfMemoryError the way CUDA does, for the calls it is told to."""

from __future__ import annotations

import functools
import weakref

import numpy as np
import pytest
import torch
from util import read_records, write_manifest

OOM_MESSAGE = "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.11 GiB total capacity)"


def _rows(inputs_dir, n=4):
    images = ("bear.png", "diner.png", "gummy.png", "face.png")
    return [{"id": f"row-{i}", "spec": "sdxl-text2img", "prompt": f"picture {i}", "num_inference_steps": 1,
             "ip_image": str(inputs_dir / images[i % len(images)])} for i in range(n)]


@pytest.fixture
def loaded(models_env):
    from ipaflow.specs.registry import SpecRegistry
    from ipaflow.tasks.pipelines import PIPELINES

    return PIPELINES.get(SpecRegistry().get("sdxl-text2img"))


@pytest.fixture
def tight_memory(loaded, monkeypatch):
    """The pipeline runs out of memory for any call of more than one row, or for a prompt saying "huge", and
    refuses to run while the memory of a failed call is still held. Returns the row count of every call."""
    pipeline_class = type(loaded.pipe)
    original = pipeline_class.__call__
    calls: list[int] = []
    failed_calls_memory: list[weakref.ref] = []

    @functools.wraps(original)  # keeps the signature, which ipaflow reads for the default guidance
    def call(self, *args, **kwargs):
        # A retry must not start while a failed call's tensors are still held (by its exception's traceback).
        assert not [ref for ref in failed_calls_memory if ref() is not None], "a failed call still holds memory"
        prompts = kwargs["prompt"] if isinstance(kwargs["prompt"], list) else [kwargs["prompt"]]
        calls.append(len(prompts))
        if len(prompts) > 1 or any("huge" in p for p in prompts):
            activations = torch.empty(1024)
            failed_calls_memory.append(weakref.ref(activations))
            raise torch.OutOfMemoryError(OOM_MESSAGE)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", call)
    yield calls
    loaded.batch_limits.clear()  # the cached pipeline is shared with other tests


def _jobs_and_inputs(rows):
    from ipaflow.core.storage import Storage
    from ipaflow.specs.registry import SpecRegistry
    from ipaflow.specs.rows import resolve_rows
    from ipaflow.tasks.inputs import InputFetcher

    registry = SpecRegistry()
    jobs, bad = resolve_rows(rows, registry)
    assert not bad
    fetcher = InputFetcher(Storage(), jobs, {"sdxl-text2img": registry.get("sdxl-text2img")})
    fetcher.prefetch(jobs)
    inputs = [fetcher.get(job) for job in jobs]
    fetcher.close()
    return jobs, inputs


def test_oom_splits_the_batch_until_it_fits(loaded, tight_memory, monkeypatch, inputs_dir):
    from ipaflow.tasks.render import render_rows

    jobs, inputs = _jobs_and_inputs(_rows(inputs_dir))
    split = list(render_rows(loaded, jobs, inputs))
    assert tight_memory == [4, 2, 1, 1, 2, 1, 1]  # halves, then quarters; nothing failed on the way
    assert [r.job.id for r in split] == [job.id for job in jobs]
    assert all(r.problem is None and r.batch_size == 1 for r in split)

    from ipaflow.tasks.worker import _batches  # later batches of that shape start at the size that fitted
    assert loaded.batch_limits == {(None, None, None): 1}
    ready = {job.id: row for job, row in zip(jobs, inputs)}
    assert [len(batch) for batch in _batches(loaded, jobs, ready, batch_size=4)] == [1, 1, 1, 1]

    monkeypatch.undo()  # enough memory again: each row alone gives the same pixels
    for result, job, row in zip(split, jobs, inputs):
        alone = next(render_rows(loaded, [job], [row]))
        assert np.array_equal(np.asarray(result.images[0]), np.asarray(alone.images[0])), job.id


def test_oom_while_decoding_leaves_the_pipeline_usable(models_env, monkeypatch, inputs_dir):
    """On a GPU, SDXL upcasts its float16 VAE to decode and casts it back after; an out-of-memory in the decoder
    (where the memory peaks) must not leave it float32, or every later row fails on a dtype mismatch. Run here
    with a float16 copy of the pipeline (not the shared cached one)."""
    from ipaflow.specs.registry import SpecRegistry
    from ipaflow.tasks.pipelines import LoadedPipeline, build_pipeline
    from ipaflow.tasks.render import render_rows

    spec = SpecRegistry().get("sdxl-text2img")
    pipe = build_pipeline(spec).pipe.to(dtype=torch.float16)
    half = LoadedPipeline(spec=spec, pipe=pipe, device=torch.device("cpu"), dtype=torch.float16)
    decode = type(pipe.vae).decode

    def tight_decoder(self, latents, *args, **kwargs):
        if latents.shape[0] > 1:
            raise torch.OutOfMemoryError(OOM_MESSAGE)
        return decode(self, latents, *args, **kwargs)

    monkeypatch.setattr(type(pipe.vae), "decode", tight_decoder)
    jobs, inputs = _jobs_and_inputs(_rows(inputs_dir, 2))
    results = list(render_rows(half, jobs, inputs))
    assert [(r.problem, r.batch_size) for r in results] == [(None, 1), (None, 1)]
    assert pipe.vae.dtype == torch.float16


def test_row_that_ooms_alone_fails_alone_with_a_reason(tmp_path, inputs_dir, tight_memory, prefect_api):
    from ipaflow.flows.render import render_manifest

    rows = _rows(inputs_dir)
    rows[2]["prompt"] = "a huge picture"
    summary = render_manifest(str(write_manifest(tmp_path / "m.parquet", rows)), out=str(tmp_path / "out"),
                              options={"batch_size": 4})
    assert (summary.rendered, summary.failed) == (3, 1)
    records = read_records(tmp_path / "out").set_index("id")
    assert records.loc["row-2", "status"] == "failed"
    assert records.loc["row-2", "error"] == "render: out of GPU memory even as a batch of one"
    assert records.drop("row-2")["status"].eq("ok").all()
    assert records.drop("row-2")["batch_size"].eq(1).all()  # rendered after the split
    assert (tmp_path / "out" / "images" / "row-3.png").exists()
    assert not (tmp_path / "out" / "images" / "row-2.png").exists()
