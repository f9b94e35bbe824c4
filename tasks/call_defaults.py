"""What a spec's pipeline call does with the parameters nobody gave: the defaults of its ``__call__``.

Some rules depend on them: an image-to-image style task runs int(num_inference_steps x strength) denoising
steps, and where neither the row nor the spec gives ``strength`` the pipeline's own default decides (0.3 for
SDXL image-to-image, 0.8 for SD 1.5; 0.9999 for SDXL inpainting, 1.0 for SD 1.5). The concrete pipeline
class comes from the model's ``model_index.json`` the way diffusers' ``AutoPipelineFor*`` picks it, read
from the models folder or the Hugging Face cache without loading a weight. ``render`` fails such rows while
planning and ``validate`` reports them, with the same reason (``denoising_problem``), never a tensor error
from inside the pipeline.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any

from ipaflow.core.problems import Problem
from ipaflow.core.storage import describe_error
from ipaflow.specs.spec import Spec

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=64)
def _defaults(pipeline: str, model: str, models_dir: str | None) -> tuple[tuple[str, Any], ...]:
    from ipaflow.tasks.models import LIBRARY_IMPORTS, resolve_model

    found = resolve_model(model, models_dir)
    index = Path(found) / "model_index.json"
    if not index.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(found, "model_index.json")
        except ValueError:  # not a hub id either (HFValidationError)
            return ()
        if not isinstance(cached, str):
            return ()  # not here yet: loading the pipeline will say so
        index = Path(cached)
    try:
        class_name = json.loads(index.read_text())["_class_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return ()
    with LIBRARY_IMPORTS:  # the command line preloads a pipeline in another thread meanwhile
        from diffusers.pipelines import auto_pipeline

        mapping = {"AutoPipelineForImage2Image": auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
                   "AutoPipelineForInpainting": auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING,
                   "AutoPipelineForText2Image": auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING}.get(pipeline)
        cls = mapping and auto_pipeline._get_task_class(mapping, class_name, throw_error_if_not_exist=False)
        if cls is None:
            return ()
        return tuple((name, p.default) for name, p in inspect.signature(cls.__call__).parameters.items()
                     if p.default is not inspect.Parameter.empty)


def call_defaults(spec: Spec, models_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The defaults of the ``__call__`` of the pipeline class ``spec`` renders with; empty when the model's
    ``model_index.json`` is not at hand."""
    from ipaflow.tasks.models import models_root

    root = models_root(models_dir)
    try:
        return dict(_defaults(spec.profile.pipeline, spec.model, str(root) if root else None))
    except Exception as exc:  # noqa: BLE001 - a rule that cannot be judged here is judged by the call itself
        log.warning("cannot read the call defaults of spec %s: %s", spec.name, describe_error(exc))
        return {}


def needs_call_defaults(spec: Spec) -> bool:
    """Whether a row of ``spec`` may depend on a pipeline default that a rule checks (the row checks of
    ``specs.rows`` cover rows where the row or the spec gives every value)."""
    given = spec.default_params()
    return spec.profile.steps_scale_with_strength and (given.get("num_inference_steps") is None
                                                       or given.get("strength") is None)


def denoising_problem(params: dict[str, Any], spec: Spec, defaults: dict[str, Any]) -> Problem | None:
    """Why a row of an image-to-image style task would run no denoising step, or None."""
    from ipaflow.specs.rows import steps_problem

    steps = params.get("num_inference_steps") or defaults.get("num_inference_steps")
    strength = params.get("strength") if params.get("strength") is not None else defaults.get("strength")
    if steps is None or strength is None:
        return None
    return steps_problem(spec, int(steps), float(strength), given=params)


def denoising_failures(jobs: list, specs: dict[str, Spec], models_dir: str | None = None) -> dict[int, Problem]:
    """Per manifest index, the rows of ``jobs`` (jobs or drafts) that would run no denoising step with their
    pipeline's defaults; only specs that leave steps or strength to the pipeline are looked at."""
    failed: dict[int, Problem] = {}
    defaults: dict[str, dict | None] = {}  # per spec, once: this runs for every row
    for job in jobs:
        spec = specs[job.spec]
        if job.spec not in defaults:
            defaults[job.spec] = call_defaults(spec, models_dir) if needs_call_defaults(spec) else None
        if defaults[job.spec] is not None and (problem := denoising_problem(job.params, spec, defaults[job.spec])):
            failed[job.index] = problem
    return failed
