"""GPU memory: whether a pipeline needs its memory savers, and how many rows a batch can hold.

The guide turns on ``enable_model_cpu_offload()``, which moves every model between host and GPU on every call:
right for a 12 GB card, a pure loss on an 80-141 GB one. ipaflow decides from the free GPU memory instead
(``memory: auto``, the default; ``true`` / ``false`` are obeyed as given):

- **CPU offload**, once, when the pipeline is built: offload only when the pipeline's weights plus one row at
  the spec's default size do not fit in free GPU memory.
- **VAE slicing / tiling**, per batch: slice (decode one image at a time) when the batch's decode does not fit,
  tile when even one image's does not.
- **Batch size**: the starting number of rows per call of a shape is what fits beside the weights, capped by
  ``--batch-size``; the out-of-memory split stays as the safety net.

How much memory a row needs is traced, not guessed: the denoiser (UNet, AnimateDiff's motion UNet, a
ControlNet) and the VAE decoder are run once per shape on PyTorch's ``meta`` device, which computes shapes but
neither allocates nor computes, under a dispatch mode that counts the bytes of live tensors (under a second per
model). Attention is counted as the fused kernels run it on a GPU (no N x N score matrix). The figure is scaled by
``SAFETY`` for the allocator's fragmentation and kernel workspaces, and corrected per shape by the peak measured on
each batch (``Measured``). The decisions themselves are plain functions of byte counts (unit-tested).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

log = logging.getLogger("ipaflow.memory")

MiB = 1 << 20
GiB = 1 << 30
SAFETY = 1.3  # traced peaks x this: allocator fragmentation, cuDNN / attention workspaces
RESERVE = 1 * GiB  # kept free: CUDA graph pools, the CUDA context of other processes, growth of the caches
PROMPT_TOKENS = 77


# -------------------------------------------------------------------------------------------- decisions
def decided_by_memory(setting: bool | str) -> bool:
    """Whether a memory saver's setting leaves it to the free memory ("auto") rather than on or off."""
    return setting == "auto"


@dataclass(frozen=True)
class Decision:
    on: bool
    reason: str


def decide_offload(setting: bool | str, weights: int, one_row: int, free: int | None) -> Decision:
    """Model CPU offload: as the spec says, or (``auto``) only when the weights and one row do not fit in ``free``
    bytes of GPU memory. ``free`` is None without a GPU: nothing to offload to."""
    if free is None:
        return Decision(False, "no GPU")
    if not decided_by_memory(setting):
        return Decision(bool(setting), f"the spec sets cpu_offload: {str(bool(setting)).lower()}")
    need = weights + SAFETY * one_row + RESERVE
    verdict = "does not fit" if need > free else "fits"
    return Decision(need > free, f"weights {in_gib(weights)} + one row {in_gib(SAFETY * one_row)} + reserve {in_gib(RESERVE)} "
                                 f"{verdict} in {in_gib(free)} free")


def fit_rows(cap: int, need: Callable[[int], float], available: int | None) -> int:
    """The most rows (1 to ``cap``) whose activation bytes ``need(rows)`` (non-decreasing) fit:
    ``SAFETY * need(rows) + RESERVE <= available``. Without a GPU (``available`` None) the cap."""
    if available is None:
        return cap
    fits = lambda rows: SAFETY * need(rows) + RESERVE <= available  # noqa: E731
    low, high = 1, cap
    while low < high:  # the largest rows that fit, or 1
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def decide_vae(slicing: bool | str, tiling: bool | str, decode_batch: float, decode_one: float, decode_tile: float,
               available: int | None) -> tuple[bool, bool]:
    """(slicing, tiling) for one batch. ``auto`` slices when the batch's decode does not fit in ``available`` bytes
    and tiles when one image's does not (and a tile's would); explicit settings are obeyed."""
    if available is None:
        return (slicing is True, tiling is True)
    room = available - RESERVE
    slice_on = SAFETY * decode_batch > room if decided_by_memory(slicing) else bool(slicing)
    single = decode_one if slice_on else decode_batch
    tile_on = (SAFETY * single > room and decode_tile < single) if decided_by_memory(tiling) else bool(tiling)
    return slice_on, tile_on


def in_gib(n: float) -> str:
    """Bytes as GiB, one decimal, for a decision's reason."""
    return f"{n / GiB:.1f} GiB"


# ----------------------------------------------------------------------------------------- measuring
def available_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation can get on ``device``: free on the card plus what PyTorch's cache holds unused.
    None on a CPU (no limit ipaflow manages) or another accelerator."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def module_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}  # shared (tied) tensors once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def pipeline_bytes(pipe) -> int:
    """Bytes of every model of a diffusers pipeline (weights and buffers, adapters and ControlNet included)."""
    modules = {id(m): m for m in pipe.components.values() if isinstance(m, torch.nn.Module)}
    return sum(module_bytes(m) for m in modules.values())


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of the tensors alive at once while ops run (each storage counted once, views free)."""

    def __init__(self):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self._live: dict[int, tuple[object, int]] = {}
        self._current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                ref = self._ref(storage)
                if ref.cdata not in self._live:
                    self._live[ref.cdata] = (ref, storage.nbytes())
                    self._current += storage.nbytes()
        for key in [key for key, (ref, _) in self._live.items() if ref.expired()]:
            self._current -= self._live.pop(key)[1]
        self.peak = max(self.peak, self._current)
        return out


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    """While tracing: attention as the fused GPU kernels run it (the output only, no N x N scores)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def output_only(query, key, value, *args, **kwargs):
        return query.new_empty((*query.shape[:-1], value.shape[-1]))

    F.scaled_dot_product_attention = output_only
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


_TRACE_LOCK = threading.Lock()  # the attention patch above is process-wide
_TRACED: dict[tuple, int] = {}


def traced_peak(key: tuple, build: Callable[[], torch.nn.Module], run: Callable[[torch.nn.Module], object]) -> int:
    """Peak activation bytes of ``run(model)`` on a meta-device twin made by ``build()``, cached under ``key``."""
    with _TRACE_LOCK:
        if key not in _TRACED:
            with torch.device("meta"):
                model = build()
                tracer = _LiveBytes()
                with torch.inference_mode(), _fused_attention(), tracer:
                    run(model)
            _TRACED[key] = tracer.peak
        return _TRACED[key]


def _config_key(module) -> tuple:
    return type(module).__name__, repr(sorted(dict(module.config).items()))


def _twin(module, dtype: torch.dtype, **overrides) -> Callable[[], torch.nn.Module]:
    """A builder of a meta copy of a diffusers model from its config (an IP-Adapter's image projection left out:
    its few tokens weigh nothing next to the feature maps)."""
    def build():
        # nn.Module.to: diffusers' own `to` warns about float32-kept modules, which a twin has no use for
        return torch.nn.Module.to(type(module).from_config({**dict(module.config), **overrides}), dtype)
    return build


def denoiser_bytes(pipe, samples: int, height: int, width: int, frames: int | None, dtype: torch.dtype) -> int:
    """Peak activation bytes of one denoising step over ``samples`` latents (rows x images x 2 with guidance)."""
    unet = pipe.unet
    config = unet.config
    h, w = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
    cross = config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    video = frames is not None and "Motion" in type(unet).__name__

    def run_unet(model):
        shape = (samples, config.in_channels, frames, h, w) if video else (samples, config.in_channels, h, w)
        added = None
        if config.addition_embed_type == "text_time":
            text = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            added = {"text_embeds": torch.empty(samples, text, dtype=dtype), "time_ids": torch.empty(samples, 6, dtype=dtype)}
        prompts = samples * frames if video else samples  # AnimateDiff hands the prompt over once per frame
        model(torch.empty(shape, dtype=dtype), torch.tensor(999),
              encoder_hidden_states=torch.empty(prompts, PROMPT_TOKENS, cross, dtype=dtype), added_cond_kwargs=added)

    key = (*_config_key(unet), samples, h, w, frames if video else None, str(dtype))
    total = traced_peak(key, _twin(unet, dtype, encoder_hid_dim_type=None, encoder_hid_dim=None), run_unet)
    controlnet = getattr(pipe, "controlnet", None)
    if isinstance(controlnet, torch.nn.Module):
        def run_controlnet(model):
            model(torch.empty(samples, config.in_channels, h, w, dtype=dtype), torch.tensor(999),
                  encoder_hidden_states=torch.empty(samples, PROMPT_TOKENS, cross, dtype=dtype),
                  controlnet_cond=torch.empty(samples, 3, height, width, dtype=dtype))

        key = (*_config_key(controlnet), samples, height, width, str(dtype))
        # its residuals stay alive while the unet runs: counting both peaks whole is the safe side
        total += traced_peak(key, _twin(controlnet, dtype, encoder_hid_dim_type=None, encoder_hid_dim=None),
                             run_controlnet)
    return total


def decode_dtype(pipe, dtype: torch.dtype) -> torch.dtype:
    """SDXL pipelines (those with ``upcast_vae``) decode a float16 VAE in float32 when its config says
    ``force_upcast``; the SD1.5 ones decode in the VAE's dtype."""
    upcasts = hasattr(pipe, "upcast_vae") and getattr(pipe.vae.config, "force_upcast", False)
    return torch.float32 if dtype == torch.float16 and upcasts else dtype


def decode_bytes(pipe, images: int, height: int, width: int, dtype: torch.dtype) -> int:
    """Peak activation bytes of decoding ``images`` latents to ``height`` x ``width`` pixels at once."""
    vae = pipe.vae
    dtype = decode_dtype(pipe, dtype)
    h, w = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor

    def run(model):
        model.decode(torch.empty(images, vae.config.latent_channels, h, w, dtype=dtype))

    key = (*_config_key(vae), images, h, w, str(dtype))
    return traced_peak(key, _twin(vae, dtype), run)


# ------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class RowShape:
    """What decides a row's activation memory: its output size, frames, images per prompt and guidance."""

    width: int
    height: int
    frames: int | None = None
    images: int = 1
    cfg: bool = True

    @property
    def samples(self) -> int:
        """Latents the denoiser sees per row."""
        return self.images * (2 if self.cfg else 1)


@dataclass
class MemoryPlan:
    """Per pipeline: its weights, and per shape the traced bytes a row needs, corrected by measured peaks."""

    pipe: object
    device: torch.device
    dtype: torch.dtype
    slicing: bool | str = "auto"
    tiling: bool | str = "auto"
    weights: int = 0
    correction: dict[RowShape, float] = field(default_factory=dict)  # measured / traced, per shape
    _logged: set = field(default_factory=set)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def per_row(self, shape: RowShape) -> tuple[int, int]:
        """(denoising bytes per row, decoding bytes per image) for ``shape``."""
        denoise = denoiser_bytes(self.pipe, shape.samples, shape.height, shape.width, shape.frames, self.dtype)
        decode = decode_bytes(self.pipe, 1, shape.height, shape.width, self.dtype)
        return denoise, decode

    def _decoded_at_once(self, shape: RowShape, rows: int) -> int:
        """Images the pipeline decodes in one go for ``rows`` rows (AnimateDiff decodes 16 frames at a time)."""
        images = rows * shape.images * (shape.frames or 1)
        return min(images, 16) if shape.frames else images

    def need(self, shape: RowShape, rows: int, slicing: bool) -> float:
        """Activation bytes of a call of ``rows`` rows: denoising and decoding do not overlap, so the larger;
        decoding one image at a time when ``slicing``."""
        denoise, decode = self.per_row(shape)
        decoded = 1 if slicing else self._decoded_at_once(shape, rows)
        return self.correction.get(shape, 1.0) * max(rows * denoise, decoded * decode)

    def batch_rows(self, shape: RowShape, cap: int) -> int:
        """The starting batch size of ``shape``: what fits in free GPU memory, at most ``cap``. Where slicing
        may be turned on (``auto`` or ``true``) the decode is counted one image at a time."""
        if not self.on_gpu:
            return cap
        available = available_bytes(self.device)
        slicing = self.slicing is not False
        rows = fit_rows(cap, lambda n: self.need(shape, n, slicing), available)
        if (shape, rows) not in self._logged:
            self._logged.add((shape, rows))
            log.info("batches of %sx%s%s start at %d rows (cap %d): %s of activations, %s available", shape.width,
                     shape.height, f"x{shape.frames}" if shape.frames else "", rows, cap,
                     in_gib(SAFETY * self.need(shape, rows, slicing)), in_gib(available or 0))
        return rows

    def vae_savers(self, shape: RowShape, rows: int) -> tuple[bool, bool]:
        """(slicing, tiling) for a batch of ``rows`` rows of ``shape``."""
        if not self.on_gpu or (not decided_by_memory(self.slicing) and not decided_by_memory(self.tiling)):
            return (self.slicing is True, self.tiling is True)
        tile = getattr(self.pipe.vae, "tile_sample_min_size", None) or max(shape.width, shape.height)
        tile_h, tile_w = min(shape.height, tile), min(shape.width, tile)
        one = decode_bytes(self.pipe, 1, shape.height, shape.width, self.dtype)
        batch = one * self._decoded_at_once(shape, rows)  # linear in the images (traced: 4 images = 4x one)
        tiled = decode_bytes(self.pipe, 1, tile_h, tile_w, self.dtype)
        factor = self.correction.get(shape, 1.0)
        return decide_vae(self.slicing, self.tiling, factor * batch, factor * one, factor * tiled,
                          available_bytes(self.device))

    def apply_vae_savers(self, shape: RowShape, rows: int) -> None:
        slicing, tiling = self.vae_savers(shape, rows)
        vae = self.pipe.vae
        if (getattr(vae, "use_slicing", False), getattr(vae, "use_tiling", False)) != (slicing, tiling):
            if self.on_gpu:
                log.info("VAE slicing %s, tiling %s for batches of %d rows of %sx%s", "on" if slicing else "off",
                         "on" if tiling else "off", rows, shape.width, shape.height)
            vae.use_slicing, vae.use_tiling = slicing, tiling

    @contextlib.contextmanager
    def measured(self, shape: RowShape, rows: int) -> Iterator[None]:
        """Measure the call's peak on a GPU and correct the traced figure of ``shape`` by it."""
        if not self.on_gpu:
            yield
            return
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        peak = torch.cuda.max_memory_allocated(self.device) - base
        self.correction.pop(shape, None)
        traced = self.need(shape, rows, bool(getattr(self.pipe.vae, "use_slicing", False)))
        if traced > 0 and peak > 0:
            self.correction[shape] = min(4.0, max(0.5, peak / traced))
