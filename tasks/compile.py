"""The compiled mode: ``torch.compile`` of the denoiser (UNet, AnimateDiff's motion UNet, a ControlNet) and of the
VAE decoder where it pays, kept per worker per (spec, image shape) with CUDA graphs per batch shape, and the
compiler's cache on disk.

What is compiled follows diffusers' own recipes: LoRAs are fused into the weights first (and their layers
unloaded), self-attention runs on fused QKV projections where the adapters allow it (IP-Adapter processors own
the cross-attention, so only the self-attention projections are fused), and on a GPU the denoiser is compiled
with CUDA graphs (inductor's ``reduce-overhead`` plus diffusers' ``conv_1x1_as_mm``), so a step is one graph
launch: that is what a batch of one needs most. The batch dimension is compiled dynamic, so one compile per
(spec, image shape) serves every batch size (the full batches, a shard's last smaller one, another
``--batch-size``), while the CUDA graphs, which are static, are recorded per batch shape on its first call;
both are kept by the worker process for the pipeline's life. ``IPAFLOW_COMPILE_SCOPE=regional`` compiles the
repeated transformer blocks instead of the whole denoiser (about half the compile time on the CPU, measured;
no whole-step graph).

When (``compile: auto|on|off`` in a spec, ``render --compile`` over it):

- ``off``: eager.
- ``on``: the denoiser is compiled for every shape the first time it is seen (the VAE decoder as in ``auto``).
- ``auto`` (the default): on a GPU only, a shape is compiled when its rows make it pay: the rows of that shape
  the shard still holds, plus as many as the worker already rendered of it (a long run keeps its compiled
  modules from shard to shard), x steps x the eager time per row-step (measured on its first batch, run
  eagerly) x the share compiling saves (measured once compiled, ``DEFAULT_SAVING`` before) against the compile
  time (measured on this machine before, from the records below, else ``DEFAULT_COMPILE_SECONDS``).

The compiler's caches (inductor's FX graph and autotuning caches, Triton kernels) live in
``$IPAFLOW_COMPILE_CACHE`` (default ``~/.cache/ipaflow/compile``) unless ``TORCHINDUCTOR_CACHE_DIR`` is set, so
the nightly scheduled run reloads what the last one compiled (measured on the CPU: 81 s cold, 9 s warm). Next to
them, ``records.json`` keeps per machine, torch version, spec and shape the measured compile seconds and
eager / compiled seconds per row-step that ``auto`` judges by.

A compile that fails never fails a row: the batch is rendered again eagerly and, if that works, the pipeline
stays eager for the rest of the process, with one warning. Compiling needs the pipeline resident on the GPU
(model CPU offload moves weights inside the forward, which a compiled graph cannot); an offloaded pipeline
stays eager and says so once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("ipaflow.compile")

CACHE_ENV = "IPAFLOW_COMPILE_CACHE"
SCOPE_ENV = "IPAFLOW_COMPILE_SCOPE"  # full (default) | regional
DEFAULT_CACHE = "~/.cache/ipaflow/compile"
# What a first compile is assumed to cost until this machine has measured one (records.json): about a minute
# and a half for an SD-family denoiser, the VAE decoder a smaller graph.
DEFAULT_COMPILE_SECONDS = {"denoiser": 90.0, "decode": 30.0}
# Share of a stage's eager time that compiling saves, until measured: an assumption on the low side, so that
# only shapes with many rows compile before the first measurement.
DEFAULT_SAVING = 0.2
RECOMPILE_LIMIT = 64  # compiled variants per function: (block shapes x batch shapes), across pipelines
GPU_OPTIONS = {"triton.cudagraphs": True, "conv_1x1_as_mm": True}  # reduce-overhead + diffusers' SD recipe


def compile_pays(work: float, eager_seconds_per_work: float, saving: float, compile_seconds: float) -> bool:
    """Whether compiling a shape pays: the eager time of the work left (row-steps for the denoiser, rows for the
    decoder) x the share compiling saves > the compile time."""
    return work * eager_seconds_per_work * saving > compile_seconds


def resolve_setting(run: str | None, spec: str) -> str:
    """The run's ``--compile`` when given, else the spec's ``compile``."""
    return run or spec


# ------------------------------------------------------------------------------------ the on-disk cache
def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def use_cache_dir() -> Path:
    """Point inductor's caches at ipaflow's folder (unless the user chose one for inductor) and return it."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    if os.environ.get(CACHE_ENV) or "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    return folder


class Records:
    """``records.json`` in the cache folder: measured figures per (machine, torch, spec, unit, shape)."""

    def __init__(self, folder: Path):
        self.path = folder / "records.json"
        self._lock = threading.Lock()

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> dict:
        entry = self._read().get(key)
        return entry if isinstance(entry, dict) else {}

    def update(self, key: str, **values: float | str) -> None:
        """Merge ``values`` into the entry (atomic replace; concurrent workers: the last writer wins)."""
        with self._lock:
            data = self._read()
            data[key] = {**(data.get(key) if isinstance(data.get(key), dict) else {}), **values}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".records-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=1, sort_keys=True)
            os.replace(tmp, self.path)


# -------------------------------------------------------------------------------- preparing the models
def fuse_loras(pipe) -> bool:
    """Fuse the loaded LoRAs (with their set weights) into the base weights and drop the LoRA layers, as
    diffusers advises before compiling; returns whether there were any."""
    if not getattr(pipe, "get_list_adapters", None) or not any(pipe.get_list_adapters().values()):
        return False
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return True


def fuse_self_attention(module: torch.nn.Module) -> int:
    """Fused QKV projections for the self-attention of every transformer block that runs the stock SDPA
    processor (IP-Adapter processors, on the cross-attention, keep theirs). The separate projections become
    views of the fused weight, so no memory is added. Returns how many were fused."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

    fused = 0
    for block in module.modules():
        if not isinstance(block, BasicTransformerBlock) or block.only_cross_attention:
            continue
        attn = block.attn1
        if type(attn.processor) is not AttnProcessor2_0 or attn.is_cross_attention or getattr(attn, "fused_projections", False):
            continue
        with torch.no_grad():
            attn.fuse_projections()
            weight = attn.to_qkv.weight
            rows = [attn.to_q.weight.shape[0], attn.to_k.weight.shape[0], attn.to_v.weight.shape[0]]
            for linear, part in zip((attn.to_q, attn.to_k, attn.to_v), torch.split(weight, rows)):
                linear.weight = torch.nn.Parameter(part, requires_grad=False)
            if attn.to_qkv.bias is not None:
                for linear, part in zip((attn.to_q, attn.to_k, attn.to_v), torch.split(attn.to_qkv.bias, rows)):
                    linear.bias = torch.nn.Parameter(part, requires_grad=False)
        attn.set_processor(FusedAttnProcessor2_0())
        fused += 1
    return fused


def _mark_batch_dynamic(value) -> None:
    """Mark the leading (batch) dimension of every tensor in a call's arguments as dynamic, where it can be."""
    if isinstance(value, torch.Tensor):
        if value.ndim > 0:
            torch._dynamo.maybe_mark_dynamic(value, 0)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _mark_batch_dynamic(item)
    elif isinstance(value, dict):
        for item in value.values():
            _mark_batch_dynamic(item)


def _batch_dynamic(compiled):
    """A compiled forward whose kernels take any batch size: one compile per image shape serves the full batches,
    the last smaller batch of a shard and every ``--batch-size``; CUDA graphs are still recorded per batch size
    (a graph is static), which costs one call, not a compile. A batch dimension of 1 (one row without guidance) is
    specialised by the compiler and compiles once more."""
    @functools.wraps(compiled)
    def forward(*args, **kwargs):
        _mark_batch_dynamic(args)
        _mark_batch_dynamic(kwargs)
        return compiled(*args, **kwargs)

    return forward


def _regions(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks compiled in the regional scope: the transformer blocks (attention + feed-forward)."""
    from diffusers.models.attention import BasicTransformerBlock

    return [m for m in module.modules() if isinstance(m, BasicTransformerBlock)]


@dataclass
class Unit:
    """What is compiled together and judged together: the denoiser (unet + ControlNet) or the VAE decoder."""

    name: str
    modules: list[torch.nn.Module]
    options: dict
    compiled: list[tuple[torch.nn.Module, object]] = field(default_factory=list)  # (module, compiled forward)
    shapes: set = field(default_factory=set)  # batch shapes compiled (or being compiled)

    def build(self, scope: str) -> None:
        if self.compiled:
            return
        targets = [r for m in self.modules for r in _regions(m)] if scope == "regional" and self.name == "denoiser" \
            else self.modules
        self.compiled = [(m, _batch_dynamic(torch.compile(m.forward, **self.options))) for m in targets]

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """Run the compiled forwards for the duration of the call (an instance attribute shadows the method)."""
        for module, forward in self.compiled:
            module.forward = forward
        try:
            yield
        finally:
            for module, _ in self.compiled:
                module.__dict__.pop("forward", None)


@dataclass
class Plan:
    """A batch's compile plan: which units run compiled, which of them compile now."""

    units: list[Unit]
    fresh: list[Unit]


class Compiler:
    """A pipeline's compiled mode (one per ``LoadedPipeline``; its calls are serialised by the pipeline's lock)."""

    def __init__(self, spec, pipe, device: torch.device):
        self.spec, self.pipe, self.device = spec, pipe, device
        self.setting = spec.compile
        self.disabled: str | None = None
        self._prepared = False
        self._left: Counter = Counter()  # rows planned per call group, not yet rendered
        self._seen: Counter = Counter()  # rows rendered per call group by this process (earlier shards too)
        self._eager: dict[tuple, float] = {}  # (unit, key) -> eager seconds per unit of work
        self._decided: set = set()
        self._written: set = set()
        self._records = Records(cache_dir())
        gpu = device.type == "cuda"
        denoisers = [m for m in (getattr(pipe, "unet", None), getattr(pipe, "controlnet", None))
                     if isinstance(m, torch.nn.Module)]
        self._units = [Unit("denoiser", denoisers, {"options": dict(GPU_OPTIONS)} if gpu and self.scope == "full" else {})]
        decoder = getattr(getattr(pipe, "vae", None), "decoder", None)
        if isinstance(decoder, torch.nn.Module):
            self._units.append(Unit("decode", [decoder], {}))  # no CUDA graphs: their pool would keep its memory

    # -- the shard's plan
    def plan(self, setting: str, groups: Counter) -> None:
        """The setting for the coming rows (a shard), and how many of them each call group (``Job.call_group``)
        holds; shapes judged not to pay are judged again with them."""
        self.setting = setting
        self._left = Counter(groups)
        self._decided.clear()

    def rendered(self, group: str, rows: int) -> None:
        self._left[group] = max(0, self._left[group] - rows)
        self._seen[group] += rows

    # -- preparing
    @property
    def scope(self) -> str:
        scope = os.environ.get(SCOPE_ENV, "full")
        return scope if scope in ("full", "regional") else "full"

    def _offloaded(self) -> bool:
        return any(getattr(m, "_hf_hook", None) is not None for m in self.pipe.components.values()
                   if isinstance(m, torch.nn.Module))

    def _prepare(self) -> None:
        """Before the first compile: the cache folder, fused LoRAs and QKV projections."""
        if self._prepared:
            return
        self._prepared = True
        folder = use_cache_dir()
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        loras = fuse_loras(self.pipe)
        fused = sum(fuse_self_attention(m) for m in self._units[0].modules)
        log.info("spec %s: compiled mode (%s scope; LoRAs fused: %s; self-attention QKV fused in %d blocks; cache %s)",
                 self.spec.name, self.scope, "yes" if loras else "none", fused, folder)

    def _record_key(self, unit: str, key) -> str:
        where = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return f"{where}|torch {torch.__version__}|{self.spec.fingerprint()}|{unit}|{key!r}"

    # -- deciding
    def watching(self) -> bool:
        """Whether calls should be timed per stage: when the compiled mode may run or learn from them."""
        if self.disabled or self.setting == "off":
            return False
        return self.setting == "on" or self.device.type == "cuda"

    def choose(self, key, group: str, rows: int, steps: int) -> Plan:
        """Which units run compiled for a batch of ``rows`` rows of call group ``group`` (``key``: the batch's
        compile shape)."""
        if not self.watching():
            return Plan([], [])
        if self._offloaded():
            self._disable("the pipeline is offloaded to the CPU (model CPU offload)", warn=self.setting == "on")
            return Plan([], [])
        use, fresh = [], []
        for unit in self._units:
            if key in unit.shapes:
                use.append(unit)
            elif self._worth(unit, key, group, rows, steps):
                unit.shapes.add(key)
                use.append(unit)
                fresh.append(unit)
        return Plan(use, fresh)

    def _worth(self, unit: Unit, key, group: str, rows: int, steps: int) -> bool:
        if self.setting == "on" and unit.name == "denoiser":
            return True
        if self.device.type != "cuda":
            return False
        eager = self._eager.get((unit.name, key))
        if eager is None:
            return False  # the first batch of a shape runs eagerly and is measured
        if (unit.name, key) in self._decided:
            return False  # judged not to pay (fewer rows are left now)
        self._decided.add((unit.name, key))
        record = self._records.get(self._record_key(unit.name, key))
        if record.get("failed"):
            return False
        compile_s = float(record.get("compile_s", DEFAULT_COMPILE_SECONDS[unit.name]))
        saving = DEFAULT_SAVING
        if record.get("eager_s") and record.get("compiled_s"):
            saving = max(0.0, 1 - record["compiled_s"] / record["eager_s"])
        # the rows left in the shard, plus as many as this worker has already rendered of the group: a run that
        # has rendered that many rows of a shape is likely to render as many more (compiled modules outlive a
        # shard); one compile serves every batch size of the shape
        left = max(self._left.get(group, 0), rows) + self._seen.get(group, 0)
        work = left * (steps if unit.name == "denoiser" else 1)
        pays = compile_pays(work, eager, saving, compile_s)
        log.info("spec %s: %s the %s for %s (%d %s left x %.2f ms eager x %.0f%% saved vs %.0f s to compile)",
                 self.spec.name, "compiling" if pays else "not compiling", unit.name, _key_text(key), work,
                 "row-steps" if unit.name == "denoiser" else "rows", eager * 1000, saving * 100, compile_s)
        return pays

    # -- running
    @contextlib.contextmanager
    def running(self, plan: Plan) -> Iterator[None]:
        if plan.fresh:
            self._prepare()
        with contextlib.ExitStack() as stack:
            for unit in plan.units:
                unit.build(self.scope)
                stack.enter_context(unit.armed())
            yield

    def observe(self, plan: Plan, key, rows: int, steps: int, stages: dict[str, float]) -> None:
        """Learn from a finished call (``stages``: seconds per stage, ``ipaflow.tasks.stages``): a unit's eager
        seconds per unit of work (a row-step for the denoiser, a row for the decoder); once compiled, what the
        compile cost and then what a compiled call takes. Each figure is written to the records once."""
        for name in ("denoiser", "decode"):
            if name not in stages:
                continue
            work = rows * steps if name == "denoiser" else rows
            per = stages[name] / max(1, work)
            unit = next((u for u in plan.units if u.name == name), None)
            if unit is None:
                self._eager.setdefault((name, key), per)
                self._write(name, key, "eager_s", per)
            elif unit in plan.fresh:
                compile_s = max(0.0, stages[name] - self._eager.get((name, key), 0.0) * work)
                self._write(name, key, "compile_s", round(compile_s, 1))
                log.info("spec %s: compiled the %s for %s in %.0f s", self.spec.name, name, _key_text(key), compile_s)
            else:
                self._write(name, key, "compiled_s", per)

    def _write(self, unit: str, key, name: str, value) -> None:
        if (unit, key, name) not in self._written:
            self._written.add((unit, key, name))
            self._records.update(self._record_key(unit, key), **{name: value})

    def failed(self, plan: Plan, key, reason: str) -> None:
        """A compiled call failed (``reason``: the exception, one line) and the batch rendered eagerly: eager from
        now on, with one warning; recorded, so that ``auto`` does not try this shape again on this machine."""
        for unit in plan.fresh:
            self._write(unit.name, key, "failed", reason.split(":")[0])
        self._disable(f"compiling failed ({reason})", warn=True)

    def _disable(self, reason: str, warn: bool) -> None:
        if self.disabled:
            return
        self.disabled = reason
        (log.warning if warn else log.info)("spec %s renders eagerly: %s", self.spec.name, reason)


def _shape_text(shape) -> str:
    width, height, frames = (getattr(shape, name, None) for name in ("width", "height", "frames"))
    if width is None:
        return repr(shape)
    return f"{width}x{height}" + (f"x{frames} frames" if frames else "")


def _key_text(key) -> str:
    return _shape_text(key[0])
