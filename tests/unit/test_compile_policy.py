"""When the compiled mode compiles: `auto` weighs the rows of a shape left in the shard against the compile time
(measured figures from records.json once there are some); `on` and `off` as they say; a failure turns it off
once. No models here: the decisions only (the compiled renders are tests/e2e/test_compile.py)."""

from __future__ import annotations

import logging
import types
from collections import Counter

import pytest
import torch

from ipaflow.specs.spec import Spec
from ipaflow.tasks.compile import DEFAULT_SAVING, Compiler, compile_pays, resolve_setting

GROUP = "group-a"
KEY = ("512x512", (1,), (), False)


def _spec(**extra) -> Spec:
    return Spec(name="s", task="text2img", model="m/m", ip_adapters=[{"model": "h94/IP-Adapter", "weight_name": "a.bin"}],
                **extra)


@pytest.fixture
def gpu_compiler(tmp_path, monkeypatch):
    """A Compiler that believes it runs on a GPU (nothing is compiled: only its decisions are asked)."""
    monkeypatch.setenv("IPAFLOW_COMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    vae = types.SimpleNamespace(decoder=torch.nn.Linear(1, 1))
    pipe = types.SimpleNamespace(components={}, unet=torch.nn.Linear(1, 1), vae=vae)

    def make(spec=None):
        return Compiler(spec or _spec(), pipe, torch.device("cuda"))

    return make


def _names(plan) -> list[str]:
    return [unit.name for unit in plan.units]


def test_compile_pays_weighs_work_against_compile_time():
    # SD1.5 at batch 16 on an H200: ~8.8 ms per row-step eager, 25 steps, 20% saved, 90 s to compile
    per_row_step, steps = 0.0088, 25
    assert not compile_pays(2000 * steps, per_row_step, DEFAULT_SAVING, 90)
    assert compile_pays(2100 * steps, per_row_step, DEFAULT_SAVING, 90)
    assert compile_pays(300 * steps, per_row_step, DEFAULT_SAVING, 10)  # a warm cache: 10 s


def test_the_run_option_overrides_the_spec():
    assert resolve_setting(None, "auto") == "auto"
    assert resolve_setting("off", "on") == "off"
    assert resolve_setting("on", "auto") == "on"


def test_off_and_auto_on_a_cpu_never_compile():
    pipe = types.SimpleNamespace(components={}, unet=torch.nn.Linear(1, 1))
    compiler = Compiler(_spec(), pipe, torch.device("cpu"))
    assert compiler.choose(KEY, GROUP, 8, 25).units == [] and not compiler.watching()
    compiler.plan("off", Counter())
    assert compiler.choose(KEY, GROUP, 8, 25).units == []
    compiler.plan("on", Counter())
    plan = compiler.choose(KEY, GROUP, 8, 25)
    assert _names(plan) == ["denoiser"] and plan.fresh == plan.units  # the decoder: never on a CPU


def test_auto_measures_a_shape_eagerly_then_compiles_when_its_rows_pay(gpu_compiler, caplog):
    compiler = gpu_compiler()
    compiler.plan("auto", Counter({GROUP: 4000}))
    first = compiler.choose(KEY, GROUP, 16, 25)
    assert first.units == []  # nothing measured yet: the first batch runs eagerly
    compiler.observe(first, KEY, 16, 25, {"denoiser": 16 * 25 * 0.0088, "decode": 16 * 0.005})
    compiler.rendered(GROUP, 16)
    with caplog.at_level(logging.INFO, logger="ipaflow.compile"):
        second = compiler.choose(KEY, GROUP, 16, 25)
    assert _names(second) == ["denoiser"]  # 3984 rows x 25 steps x 8.8 ms x 20% > 90 s; the decoder does not pay
    assert "compiling the denoiser" in caplog.text and "not compiling the decode" in caplog.text
    assert compiler.choose(KEY, GROUP, 16, 25).fresh == []  # compiled once, then kept for the shape


def test_auto_leaves_small_runs_eager_and_uses_measured_compile_times(gpu_compiler):
    compiler = gpu_compiler()
    compiler.plan("auto", Counter({GROUP: 600}))
    compiler.observe(compiler.choose(KEY, GROUP, 16, 25), KEY, 16, 25, {"denoiser": 16 * 25 * 0.0088})
    assert compiler.choose(KEY, GROUP, 16, 25).units == []  # 600 rows do not pay 90 s
    warm = gpu_compiler()  # another process, after a run that compiled this shape in 8 s (a warm cache)
    warm._records.update(warm._record_key("denoiser", KEY), compile_s=8.0, eager_s=0.0088, compiled_s=0.0062)
    warm.plan("auto", Counter({GROUP: 600}))
    warm.observe(warm.choose(KEY, GROUP, 16, 25), KEY, 16, 25, {"denoiser": 16 * 25 * 0.0088})
    assert _names(warm.choose(KEY, GROUP, 16, 25)) == ["denoiser"]


def test_on_compiles_at_once_and_a_failure_turns_compiling_off_once(gpu_compiler, caplog):
    compiler = gpu_compiler()
    compiler.plan("on", Counter({GROUP: 2}))
    plan = compiler.choose(KEY, GROUP, 2, 25)
    assert _names(plan) == ["denoiser"] and plan.fresh == plan.units
    with caplog.at_level(logging.WARNING, logger="ipaflow"):
        compiler.failed(plan, KEY, "BackendCompilerFailed: no C++ compiler")
        compiler.failed(plan, KEY, "BackendCompilerFailed: no C++ compiler")
    assert compiler.choose(KEY, GROUP, 2, 25).units == [] and not compiler.watching()
    assert [r.getMessage() for r in caplog.records] == [
        "spec s renders eagerly: compiling failed (BackendCompilerFailed: no C++ compiler)"]
    later = gpu_compiler()  # auto, in a later process, does not try the shape that failed on this machine
    later.plan("auto", Counter({GROUP: 10**6}))
    later.observe(later.choose(KEY, GROUP, 16, 25), KEY, 16, 25, {"denoiser": 1.0})
    assert later.choose(KEY, GROUP, 16, 25).units == []


def test_an_offloaded_pipeline_stays_eager(gpu_compiler, monkeypatch):
    compiler = gpu_compiler()
    monkeypatch.setattr(compiler, "_offloaded", lambda: True)
    compiler.plan("on", Counter())
    assert compiler.choose(KEY, GROUP, 2, 25).units == [] and "offloaded" in compiler.disabled



def test_auto_counts_the_rows_earlier_shards_rendered(gpu_compiler):
    """A long run cut into shards of 780 rows: no shard alone pays 90 s of compiling, but the compiled modules
    outlive a shard, so the worker compiles once it has seen enough rows of the shape."""
    compiler = gpu_compiler()
    decisions = []
    for _shard in range(3):
        compiler.plan("auto", Counter({GROUP: 780}))
        plan = compiler.choose(KEY, GROUP, 16, 25)
        decisions.append(_names(plan))
        compiler.observe(plan, KEY, 16, 25, {"denoiser": 16 * 25 * 0.0088})
        compiler.rendered(GROUP, 780)
    assert decisions == [[], [], ["denoiser"]]
