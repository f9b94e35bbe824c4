"""The spec: how a row is rendered (base model, adapters, scheduler, LoRA, ControlNet, motion adapter).

Specs are YAML files parsed with ``yaml.safe_load`` and validated by the strict pydantic models below:
unknown keys, wrong types and inconsistent combinations are errors that name the offending field.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ipaflow.specs.profiles import COMPONENT_FIELDS, PROFILES, TASKS, TaskProfile

Task = Literal[TASKS]  # the names of the task profiles

# A hub id (org/name) or a local folder; resolved by ipaflow.tasks.models.resolve_model.
_MODEL_REF = r"^[^\s]{1,512}$"
SPEC_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # matched whole (fullmatch)

# An IP-Adapter scale: a float, or an InstantStyle per-block dict such as {"up": {"block_0": [0, 1, 0]}}, as
# diffusers' set_ip_adapter_scale takes it: per part (down, mid, up) a number or one per transformer layer, or
# per block of a part a number or one per layer. Checked exactly (_adapter_scale), so no value can be large.
AdapterScale = Union[float, dict[str, Any]]
MAX_SCALE = 10.0  # as a row's ip_scale
MAX_LAYERS = 16  # scales per block (SDXL's deepest block has 10 transformer layers)
_BLOCK = re.compile(r"block_[0-9]{1,2}")


def _scale_number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_SCALE:
        raise ValueError(f"{where}: a scale is a number in [0, {MAX_SCALE:g}], got {str(value)[:40]!r}")
    return float(value)


def _layer_scales(where: str, value: Any) -> float | list[float]:
    if isinstance(value, list):
        if not 1 <= len(value) <= MAX_LAYERS:
            raise ValueError(f"{where}: give 1 to {MAX_LAYERS} scales (one per transformer layer), got {len(value)}")
        return [_scale_number(where, item) for item in value]
    return _scale_number(where, value)


def _adapter_scale(value: Any) -> AdapterScale:
    """A number, or ``{part: number | [numbers] | {block_N: number | [numbers]}}`` for part in down/mid/up."""
    if not isinstance(value, dict):
        return _scale_number("scale", value)
    if not value:
        raise ValueError("a per-block scale needs at least one of down, mid, up")
    checked: dict[str, Any] = {}
    for part, scales in value.items():
        if part not in ("down", "mid", "up"):
            raise ValueError(f"per-block scale keys must be down/mid/up, not {str(part)[:40]!r}")
        if not isinstance(scales, dict):
            checked[part] = _layer_scales(part, scales)
            continue
        if not 1 <= len(scales) <= MAX_LAYERS:
            raise ValueError(f"{part}: give 1 to {MAX_LAYERS} blocks, got {len(scales)}")
        for block in scales:
            if not isinstance(block, str) or not _BLOCK.fullmatch(block):
                raise ValueError(f"{part}: blocks are named block_0, block_1, ..., not {str(block)[:40]!r}")
        checked[part] = {block: _layer_scales(f"{part}.{block}", item) for block, item in scales.items()}
    return checked


# Output sizes must be multiples of this: the SD-family pipelines reject others (their `check_inputs`), since
# the VAE scales by 8. Checked here so that a bad spec default and a bad row cell get the same message.
SIZE_FACTOR = 8
# Spec fields that say how a row is run or what is measured of it, not what it renders (left out of the
# fingerprint, so switching them renders nothing again).
RUNTIME_FIELDS = ("memory", "compile", "score")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_ConfigValue = Union[bool, int, float, Annotated[str, Field(max_length=256)], None]


class SchedulerSpec(StrictModel):
    """A diffusers scheduler class, built with ``Class.from_config(pipeline.scheduler.config, **config)``."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9]*Scheduler$")
    config: Annotated[dict[Annotated[str, Field(max_length=64)], _ConfigValue], Field(max_length=64)] = {}


class ModelRef(StrictModel):
    model: str = Field(pattern=_MODEL_REF)
    subfolder: str | None = Field(default=None, max_length=512)


class IPAdapterSpec(ModelRef):
    weight_name: str = Field(pattern=r"^[\w.-]+\.(bin|safetensors)$")
    scale: AdapterScale = 1.0
    image_column: Literal["ip_image", "style_folder", "image", "control_image"] = "ip_image"

    @field_validator("scale", mode="before")
    @classmethod
    def _scale(cls, value: Any) -> AdapterScale:
        return _adapter_scale(value)


class LoraSpec(ModelRef):
    weight_name: str | None = Field(default=None, pattern=r"^[\w.-]+\.(bin|safetensors)$")
    adapter_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    weight: float = 1.0


class ControlNetSpec(ModelRef):
    # The default of the row parameter controlnet_conditioning_scale (the pipeline's own default, 1.0, when
    # unset); a row's value wins. Setting it here and in `defaults` too is an error: one place per value.
    conditioning_scale: float | None = Field(default=None, ge=0.0, le=10.0, allow_inf_nan=False)


# A memory saver or the compiled mode: always, never, or where ipaflow judges it needed (memory) or paying (compile).
Switch = Literal["auto", "on", "off"]
SaverSetting = Union[bool, Literal["auto"]]


class MemorySpec(StrictModel):
    """Memory savers, each ``true``, ``false`` or ``auto`` (the default): on a GPU, ``auto`` turns a saver on only
    when what it saves would not fit in free GPU memory (``ipaflow.tasks.memory``). ``cpu_offload`` is applied
    after the adapters are loaded (the guide's warning) and only where a GPU is present; the VAE savers are
    decided per batch."""

    cpu_offload: SaverSetting = "auto"
    vae_slicing: SaverSetting = "auto"
    vae_tiling: SaverSetting = "auto"


class Params(StrictModel):
    """Per-row parameters: spec ``defaults`` and manifest columns of the same names."""

    prompt: str | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = Field(default=None, ge=1, le=1000)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=100.0, allow_inf_nan=False)
    strength: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    width: int | None = Field(default=None, ge=SIZE_FACTOR, le=8192, multiple_of=SIZE_FACTOR)
    height: int | None = Field(default=None, ge=SIZE_FACTOR, le=8192, multiple_of=SIZE_FACTOR)
    num_frames: int | None = Field(default=None, ge=1, le=512)
    num_images: int | None = Field(default=None, ge=1, le=64)
    controlnet_conditioning_scale: float | None = Field(default=None, ge=0.0, le=10.0, allow_inf_nan=False)


class OutputSpec(StrictModel):
    format: Literal["png", "jpeg", "webp", "gif", "mp4", "webm"] | None = None  # default: the task's first format
    quality: int = Field(default=95, ge=1, le=100)
    fps: int = Field(default=8, ge=1, le=60)
    # files | sharded | webdataset | parquet (specs.outputs); `render --layout` wins. Where outputs are stored,
    # not what they are: it is left out of the fingerprint, so changing it re-homes outputs without new keys.
    layout: Literal["files", "sharded", "webdataset", "parquet"] | None = None


# The row parameters a sweep may vary (manifest columns of the same names), and how many combinations a row may
# expand into.
SWEEPABLE = ("seed", "ip_scale", "prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "strength",
             "width", "height", "num_frames", "num_images", "controlnet_conditioning_scale")
MAX_SWEEP = 1024
SweepValue = Union[int, float, str, list[float]]


class Spec(StrictModel):
    name: str
    description: str = Field(default="", max_length=2000)
    task: Task
    model: str = Field(pattern=_MODEL_REF)
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    variant: str | None = Field(default=None, max_length=64)
    scheduler: SchedulerSpec | None = None
    image_encoder: ModelRef | None = None
    ip_adapters: list[IPAdapterSpec] = Field(min_length=1, max_length=8)
    loras: list[LoraSpec] = Field(default=[], max_length=16)
    controlnet: ControlNetSpec | None = None
    motion_adapter: ModelRef | None = None
    memory: MemorySpec = MemorySpec()
    # The compiled mode of the denoiser (and the VAE decoder where it pays); `render --compile` overrides it.
    compile: Switch = "auto"
    # The curation score ip_similarity of each output (tasks.scores); false: recorded as null, no encoder pass.
    score: bool = True
    defaults: Params = Params()
    # Every manifest row of this spec renders each combination (``specs.sweeps``): parameter -> values.
    sweep: dict[str, list[SweepValue]] = Field(default={}, max_length=len(SWEEPABLE))
    output: OutputSpec | None = None

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, sweep: dict[str, list]) -> dict[str, list]:
        size = 1
        for name, values in sweep.items():
            if name not in SWEEPABLE:
                raise ValueError(f"sweep: {name!r} is not a row parameter; sweep one of {', '.join(SWEEPABLE)}")
            if not values:
                raise ValueError(f"sweep: {name} needs at least one value")
            size *= len(values)
        if size > MAX_SWEEP:
            raise ValueError(f"sweep: {size} combinations; at most {MAX_SWEEP} per row")
        return sweep

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not SPEC_NAME.fullmatch(value):
            raise ValueError("spec names are 1-64 characters of a-z, 0-9, '.', '_', '-', starting alphanumeric")
        return value

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_switch(cls, value: Any) -> Any:
        """YAML reads a bare ``on`` / ``off`` as true / false: take those for what was written."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _consistent(self) -> Spec:
        profile = self.profile
        for name in COMPONENT_FIELDS:
            needed = profile.component is not None and profile.component.spec_field == name
            if needed != (getattr(self, name) is not None):
                tasks = [p.name for p in PROFILES.values() if p.component and p.component.spec_field == name]
                raise ValueError(f"task {tasks[0]!r} needs a {name}, and a {name} needs task {tasks[0]!r}")
        steps, strength = self.defaults.num_inference_steps, self.defaults.strength
        if steps is not None and strength is not None and profile.denoising_steps(steps, strength) < 1:
            raise ValueError(f"defaults: {steps} step(s) x strength {strength:g} runs no denoising step; raise "
                             "num_inference_steps or strength")
        if self.output_format not in profile.formats:
            raise ValueError(f"output format {self.output_format!r} is not one task {self.task!r} writes "
                             f"({', '.join(profile.formats)})")
        if (self.controlnet is not None and self.controlnet.conditioning_scale is not None
                and self.defaults.controlnet_conditioning_scale is not None):
            raise ValueError("controlnet.conditioning_scale and defaults.controlnet_conditioning_scale set the "
                             "same value; keep one")
        return self

    @property
    def profile(self) -> TaskProfile:
        return PROFILES[self.task]

    @property
    def output_format(self) -> str:
        chosen = self.output.format if self.output is not None else None
        return chosen or self.profile.formats[0]

    def default_params(self) -> dict[str, Any]:
        """The defaults a row's parameters start from (unset ones left out)."""
        params = self.defaults.model_dump(exclude_none=True)
        if self.controlnet is not None and self.controlnet.conditioning_scale is not None:
            params["controlnet_conditioning_scale"] = self.controlnet.conditioning_scale
        return params

    @property
    def image_columns(self) -> list[str]:
        """The manifest column feeding each IP-Adapter, in adapter order."""
        return [adapter.image_column for adapter in self.ip_adapters]

    @property
    def required_columns(self) -> dict[str, str]:
        """Manifest columns a row of this spec must fill, each with what needs it (for the row's error)."""
        needed = {column: role.what for column, role in self.profile.inputs.items()}
        for number, adapter in enumerate(self.ip_adapters, 1):
            needed.setdefault(adapter.image_column, f"the image prompt of IP-Adapter {number} ({adapter.weight_name})")
        return needed

    def fingerprint(self) -> str:
        """A content hash of everything in the spec that decides an output: not its name or description, nor how
        fast or in how much memory it runs (``memory``, ``compile``: their effect on pixels stays within the
        float tolerance that batching already has), nor whether the outputs are scored (``score``), nor where
        outputs go (``output.layout``), so switching them does not render a finished dataset again."""
        payload = self.model_dump(mode="json", exclude={"name", "description", *RUNTIME_FIELDS})
        if payload.get("output"):
            payload["output"].pop("layout", None)
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
