"""Task profiles: everything ipaflow does differently per task, in one table.

A spec's ``task`` names a profile. The profile says which diffusers pipeline renders it, which extra model it
needs (a ControlNet, a motion adapter), which manifest columns feed which pipeline argument, which per-row
parameters it takes (and which it refuses rather than silently ignore), and what it writes. Row checks
(``specs.rows``), output naming (``specs.outputs``), pipeline building (``tasks.pipelines``), call building
(``tasks.render``) and the writers read the profile, so a new task is one entry here (plus its zoo models and
a spec).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Parameters every task takes.
COMMON_PARAMS = frozenset({"prompt", "negative_prompt", "num_inference_steps", "guidance_scale"})


@dataclass(frozen=True)
class InputRole:
    """A manifest column a task needs: the pipeline argument it feeds and what it is (for error messages)."""

    argument: str
    what: str


@dataclass(frozen=True)
class Component:
    """An extra model the pipeline is built with: the spec field that names it, the diffusers class that
    loads it, and the pipeline argument it is passed as."""

    spec_field: str
    model_class: str
    argument: str
    takes_variant: bool = True  # loaded with the spec's `variant` (motion adapters ship no fp16 variant files)


@dataclass(frozen=True)
class TaskProfile:
    name: str
    pipeline: str  # a diffusers class with from_pretrained
    inputs: dict[str, InputRole] = field(default_factory=dict)  # manifest column -> role, in call order
    params: frozenset[str] = frozenset()  # per-row parameters beyond COMMON_PARAMS
    refused: dict[str, str] = field(default_factory=dict)  # parameter -> why the task cannot honour it
    component: Component | None = None
    output: Literal["image", "video"] = "image"
    # Whether the pipeline runs int(num_inference_steps * strength) steps (image-to-image style denoising).
    steps_scale_with_strength: bool = False

    @property
    def formats(self) -> tuple[str, ...]:
        """Output formats this task can write; the first is the default."""
        return ("gif", "mp4", "webm") if self.output == "video" else ("png", "jpeg", "webp")

    @property
    def folder(self) -> str:
        """The output folder of the ``files`` layout."""
        return "videos" if self.output == "video" else "images"

    @property
    def sized_by_image(self) -> bool:
        """Whether the task renders at the size of its ``image`` input (it takes no width or height)."""
        return "image" in self.inputs and "width" in self.refused

    def denoising_steps(self, steps: int, strength: float) -> int:
        """The denoising steps a call runs: image-to-image style pipelines run int(steps x strength) of them
        (diffusers' ``get_timesteps``), and none at all fails the call."""
        return min(int(steps * strength), steps) if self.steps_scale_with_strength else steps

    @property
    def all_params(self) -> frozenset[str]:
        return COMMON_PARAMS | self.params

    def refuses(self, column: str, value: object) -> str | None:
        """Why a row's value for a parameter this task does not take cannot be ignored, or None."""
        reason = self.refused.get(column)
        if reason and column == "num_images" and _as_int(value) == 1:
            return None  # one output is what the row gets anyway
        return reason


def _as_int(value: object) -> object:
    try:
        return int(str(value).strip()) if isinstance(value, str) else value
    except ValueError:
        return value


_SIZE_FROM_IMAGE = "img2img renders at the size of `image`; resize the input instead"

PROFILES: dict[str, TaskProfile] = {
    profile.name: profile
    for profile in (
        TaskProfile(
            name="text2img",
            pipeline="AutoPipelineForText2Image",
            params=frozenset({"width", "height", "num_images"}),
        ),
        TaskProfile(
            name="img2img",
            pipeline="AutoPipelineForImage2Image",
            inputs={"image": InputRole("image", "the init image of task img2img")},
            params=frozenset({"strength", "num_images"}),
            refused={"width": _SIZE_FROM_IMAGE, "height": _SIZE_FROM_IMAGE},
            steps_scale_with_strength=True,
        ),
        TaskProfile(
            name="inpaint",
            pipeline="AutoPipelineForInpainting",
            inputs={"image": InputRole("image", "the init image of task inpaint"),
                    "mask": InputRole("mask_image", "the mask of task inpaint")},
            params=frozenset({"strength", "width", "height", "num_images"}),
            steps_scale_with_strength=True,
        ),
        TaskProfile(
            name="video",
            pipeline="AnimateDiffPipeline",
            params=frozenset({"width", "height", "num_frames"}),
            refused={"num_images": "video specs render one video per row"},
            component=Component("motion_adapter", "MotionAdapter", "motion_adapter", takes_variant=False),
            output="video",
        ),
        TaskProfile(
            name="controlnet",
            pipeline="AutoPipelineForText2Image",
            inputs={"control_image": InputRole("image", "the conditioning image of task controlnet")},
            params=frozenset({"width", "height", "num_images", "controlnet_conditioning_scale"}),
            component=Component("controlnet", "ControlNetModel", "controlnet"),
        ),
    )
}
TASKS = tuple(PROFILES)
COMPONENT_FIELDS = tuple(sorted({p.component.spec_field for p in PROFILES.values() if p.component}))
