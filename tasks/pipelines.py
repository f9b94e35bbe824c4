"""Building a diffusers pipeline from a spec, the way the IP-Adapter guide builds it, and caching it per process.

Order matters and follows the guide: base pipeline (with image encoder / ControlNet / motion adapter passed
in), scheduler, IP-Adapters, then LoRAs (after the IP-Adapters), then memory savers (CPU offload last, and
only where a GPU is present and, with ``cpu_offload: auto``, only when the pipeline and a row do not fit in free
GPU memory: ``ipaflow.tasks.memory``). Everything is loaded through the public diffusers/transformers API.

A loaded pipeline carries what renders learn about it: the batch size that fits per shape (traced, measured,
taught by out-of-memory splits), its compiled mode (``ipaflow.tasks.compile``) and its stage clock
(``ipaflow.tasks.stages``).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ipaflow.specs.rows import Job
from ipaflow.specs.spec import Spec
from ipaflow.tasks.compile import Compiler
from ipaflow.tasks.embeddings import EmbeddingCache
from ipaflow.tasks.memory import MemoryPlan, RowShape, available_bytes, decide_offload, pipeline_bytes
from ipaflow.tasks.model_files import explain
from ipaflow.tasks.models import LIBRARY_IMPORTS, models_root, pick_device, pick_dtype, resolve_model
from ipaflow.tasks.stages import StageClock

log = logging.getLogger("ipaflow.pipelines")
CACHE_SIZE_ENV = "IPAFLOW_PIPELINE_CACHE_SIZE"


@dataclass
class LoadedPipeline:
    """A ready pipeline plus what rendering needs to know about it."""

    spec: Spec
    pipe: object
    device: torch.device
    dtype: torch.dtype
    embeddings: EmbeddingCache = field(default_factory=EmbeddingCache)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Largest batch that fit in GPU memory, per output shape (width, height, frames), learnt from
    # out-of-memory splits so that later batches of that shape do not fail first.
    batch_limits: dict[tuple, int] = field(default_factory=dict)
    memory: MemoryPlan | None = None
    compiler: Compiler | None = None
    clock: StageClock | None = None
    _defaults: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        spec = self.spec
        if self.memory is None:
            self.memory = MemoryPlan(self.pipe, self.device, self.dtype, spec.memory.vae_slicing, spec.memory.vae_tiling)
        if self.compiler is None:
            self.compiler = Compiler(spec, self.pipe, self.device)
        if self.clock is None:
            self.clock = StageClock(self.pipe, self.device)

    def row_shape(self, job: Job, images: dict | None = None) -> RowShape:
        """What decides a row's memory: its output size, frames, images per prompt and guidance. ``images``: the
        row's input images by column; a task that refuses width/height renders at the size of its init image."""
        image = (images or {}).get("image")
        sized = image is not None and self.spec.profile.sized_by_image
        default_w, default_h = image.size if sized else self.default_size
        params = job.params
        frames = params.get("num_frames", 16) if self.spec.profile.output == "video" else None
        return RowShape(width=int(params.get("width") or default_w), height=int(params.get("height") or default_h),
                        frames=frames, images=job.num_images,
                        cfg=self.uses_cfg(params.get("guidance_scale", self.default_guidance)))

    def steps(self, job: Job) -> int:
        """Denoising steps the row runs (image-to-image style tasks run steps x strength)."""
        steps = int(job.params.get("num_inference_steps") or self._call_default("num_inference_steps"))
        if self.spec.profile.steps_scale_with_strength:
            steps = max(1, int(steps * float(job.params.get("strength", self._call_default("strength")))))
        return steps

    def batch_size(self, job: Job, cap: int, images: dict | None = None) -> int:
        """Rows per call for ``job``'s shape: what fits in free GPU memory (``memory``), at most ``cap`` and at
        most what an out-of-memory split taught."""
        from ipaflow.tasks.render import output_shape

        cap = min(cap, self.batch_limits.get(output_shape(job), cap))
        return self.memory.batch_rows(self.row_shape(job, images), cap)

    @property
    def adapter_hidden_states(self) -> list[bool]:
        """Per IP-Adapter: whether it takes the encoder's hidden states (plus, full-face) or image embeds."""
        from diffusers.models.embeddings import ImageProjection

        layers = self.pipe.unet.encoder_hid_proj.image_projection_layers
        return [not isinstance(layer, ImageProjection) for layer in layers]

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Classifier-free guidance is on when guidance > 1 and the unet is not guidance-distilled."""
        return guidance_scale > 1 and self.pipe.unet.config.time_cond_proj_dim is None

    @property
    def default_size(self) -> tuple[int, int]:
        """(width, height) the pipeline renders at when a row gives none."""
        pipe = self.pipe
        sample = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
        return sample * pipe.vae_scale_factor, sample * pipe.vae_scale_factor

    @property
    def default_guidance(self) -> float:
        return float(self._call_default("guidance_scale"))

    def _call_default(self, name: str):
        """A default of the pipeline's ``__call__`` (its signature read once: several lookups per batch)."""
        if self._defaults is None:
            import inspect

            self._defaults = {n: p.default for n, p in inspect.signature(type(self.pipe).__call__).parameters.items()}
        return self._defaults[name]


def _scheduler_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise ValueError(f"scheduler.name: {name!r} is not a diffusers scheduler")
    return cls


def quiet_libraries() -> None:
    """Batch renders log through ipaflow: no per-load progress bars or advisory warnings from the libraries."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def build_pipeline(spec: Spec, models_dir: str | None = None, device: torch.device | None = None) -> LoadedPipeline:
    """Load the spec's pipeline with the real diffusers loaders. A model file that cannot load raises
    ``ModelFileError``, naming the file and what is wrong with it (``tasks.model_files``)."""
    try:
        return _load_pipeline(spec, models_dir, device)
    except Exception as exc:
        try:
            explained = explain(spec, models_dir, exc)
        except Exception:  # noqa: BLE001 - the diagnosis is a courtesy: the build's own error stands
            log.debug("could not tell which model file of spec %s failed", spec.name, exc_info=True)
            explained = None
        if explained is None:
            raise
        raise explained from exc


def _load_pipeline(spec: Spec, models_dir: str | None, device: torch.device | None) -> LoadedPipeline:
    import diffusers
    from transformers import CLIPVisionModelWithProjection

    quiet_libraries()

    device = device or pick_device()
    dtype = pick_dtype(spec.dtype, device)
    resolve = lambda model_id: resolve_model(model_id, models_dir)  # noqa: E731
    common = {"dtype": dtype}
    if spec.variant:
        common["variant"] = spec.variant

    profile = spec.profile
    extra = {}
    if spec.image_encoder is not None:
        extra["image_encoder"] = CLIPVisionModelWithProjection.from_pretrained(
            resolve(spec.image_encoder.model), subfolder=spec.image_encoder.subfolder, dtype=dtype
        )
    if profile.component is not None:  # the ControlNet or motion adapter the task needs
        ref = getattr(spec, profile.component.spec_field)
        component = getattr(diffusers, profile.component.model_class)
        kwargs = common if profile.component.takes_variant else {"dtype": dtype}
        extra[profile.component.argument] = component.from_pretrained(resolve(ref.model), subfolder=ref.subfolder,
                                                                      **kwargs)
    pipe = getattr(diffusers, profile.pipeline).from_pretrained(resolve(spec.model), **extra, **common)

    if spec.scheduler is not None:
        cls = _scheduler_class(spec.scheduler.name)
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **spec.scheduler.config)

    adapters = spec.ip_adapters
    pipe.load_ip_adapter(
        [resolve(a.model) for a in adapters],
        subfolder=[a.subfolder or "" for a in adapters],
        weight_name=[a.weight_name for a in adapters],
    )

    if spec.loras:
        names = []
        for index, lora in enumerate(spec.loras):
            name = lora.adapter_name or f"lora_{index}"
            kwargs = {"weight_name": lora.weight_name} if lora.weight_name else {}
            if lora.subfolder:
                kwargs["subfolder"] = lora.subfolder
            pipe.load_lora_weights(resolve(lora.model), adapter_name=name, **kwargs)
            names.append(name)
        if len(names) > 1 or any(lora.weight != 1.0 for lora in spec.loras):
            pipe.set_adapters(names, [lora.weight for lora in spec.loras])

    loaded = LoadedPipeline(spec=spec, pipe=pipe, device=device, dtype=dtype)
    loaded.memory.weights = pipeline_bytes(pipe)
    offload = choose_offload(loaded)
    if offload.on:
        pipe.enable_model_cpu_offload(device=device)
    elif device.type != "cpu":  # loaded on the CPU already
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return loaded


def choose_offload(loaded: LoadedPipeline):
    """Model CPU offload or resident: as the spec says, or (``auto``) offload only when the weights and one row at
    the pipeline's default size do not fit in the free GPU memory (said in the log)."""
    spec, device = loaded.spec, loaded.device
    free = available_bytes(device)
    if free is None:
        return decide_offload(spec.memory.cpu_offload, 0, 0, None)
    width, height = loaded.default_size
    shape = RowShape(width=width, height=height, frames=16 if spec.profile.output == "video" else None)
    row = loaded.memory.need(shape, 1, slicing=spec.memory.vae_slicing is not False)
    decision = decide_offload(spec.memory.cpu_offload, loaded.memory.weights, row, free)
    log.info("spec %s: %s (%s)", spec.name, "model CPU offload" if decision.on else "resident on the GPU", decision.reason)
    return decision


class PipelineCache:
    """At most ``capacity`` loaded pipelines per process, least recently used evicted first.

    Lives at module level (``PIPELINES``) so that it survives across shard tasks and flow runs in a worker
    process; never pickled.
    """

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity or int(os.environ.get(CACHE_SIZE_ENV, "2"))
        self._items: OrderedDict[tuple, LoadedPipeline] = OrderedDict()
        self._lock = threading.Lock()
        self.builds = 0

    @staticmethod
    def _key(spec: Spec, models_dir: str | None, device: torch.device | None) -> tuple:
        # the runtime fields too: a spec that only differs in its memory savers is built differently
        runtime = spec.model_dump_json(include={"memory"})
        return (spec.fingerprint(), runtime, str(models_root(models_dir) or ""),
                str(device or pick_device()))

    def get(self, spec: Spec, models_dir: str | None = None, device: torch.device | None = None) -> LoadedPipeline:
        key = self._key(spec, models_dir, device)
        device = device or pick_device()
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            while len(self._items) >= self.capacity:
                _, evicted = self._items.popitem(last=False)
                log.info("evicting pipeline %s", evicted.spec.name)
                del evicted
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            log.info("building pipeline for spec %s on %s", spec.name, device)
            with LIBRARY_IMPORTS:
                loaded = build_pipeline(spec, models_dir, device)
            self.builds += 1
            self._items[key] = loaded
            return loaded

    def discard(self, spec: Spec, models_dir: str | None = None, device: torch.device | None = None) -> None:
        """Drop one spec's pipeline (if loaded), freeing its memory."""
        with self._lock:
            self._items.pop(self._key(spec, models_dir, device), None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
        gc.collect()


PIPELINES = PipelineCache()
