"""From manifest rows to jobs: each row checked against its spec and resolved into what to render.

Everything here is static (no I/O, no GPU): it decides whether a row is well formed and what parameters it
renders with. Problems are collected, each naming the row id, the column and the reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, ValidationError

from specs.manifest import FLOAT_COLUMNS, INPUT_COLUMNS, INT_COLUMNS, KNOWN_COLUMNS, Manifest
from specs.registry import SpecRegistry
from specs.spec import Params, Spec

ROW_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
# Names Windows reserves; an id must be usable as a file name on every filesystem users sync outputs to.
RESERVED_IDS = frozenset({"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)})
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 100_000
MAX_INPUTS_PER_CELL = 64
URI_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")

# Which per-row parameters each task uses; others are ignored (and left out of the key).
TASK_PARAMS = {
    "text2img": {"width", "height", "num_images"},
    "img2img": {"strength", "num_images"},
    "inpaint": {"strength", "width", "height", "num_images"},
    "video": {"width", "height", "num_frames"},
    "controlnet": {"width", "height", "num_images", "controlnet_conditioning_scale"},
}
COMMON_PARAMS = {"prompt", "negative_prompt", "num_inference_steps", "guidance_scale"}
SIZE_FACTOR = 8  # width and height must be multiples of the VAE scale factor of SD-family models


@dataclass(frozen=True)
class Problem:
    row: str
    column: str
    reason: str

    def __str__(self) -> str:
        return f"{self.row}, {self.column}, {self.reason}"


class Job(BaseModel):
    """One manifest row, resolved: what to render and with which parameters."""

    model_config = ConfigDict(frozen=True)

    id: str
    spec: str
    index: int
    seed: int
    params: dict[str, Any]
    inputs: dict[str, Any]
    extra: dict[str, Any] = {}

    @property
    def num_images(self) -> int:
        return int(self.params.get("num_images") or 1)


class RowError(ValueError):
    def __init__(self, column: str, reason: str):
        super().__init__(f"{column}: {reason}")
        self.column, self.reason = column, reason


class RowProblems(ValueError):
    def __init__(self, errors: list[RowError]):
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


def default_seed(row_id: str) -> int:
    """The seed of a row without one: stable across runs and machines, derived from the id alone."""
    return int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:4], "big")


def row_label(row: dict, index: int) -> str:
    value = row.get("id")
    if isinstance(value, str) and ROW_ID.match(value):
        return value
    return f"#{index}"


def check_id(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise RowError("id", "required, a non-empty string")
    if not ROW_ID.match(value):
        raise RowError("id", "must match [A-Za-z0-9._-]{1,128} and not start with '.'")
    if value.split(".", 1)[0].lower() in RESERVED_IDS:
        raise RowError("id", f"{value!r} is a reserved file name")
    return value


def _integral(column: str, value: Any) -> int:
    if isinstance(value, bool):
        raise RowError(column, "must be an integer, not a boolean")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RowError(column, f"must be a finite integer, got {value}")
        if not value.is_integer():
            raise RowError(column, f"must be an integer, got {value}")
        return int(value)
    if isinstance(value, int):
        return value
    raise RowError(column, f"must be an integer, got {type(value).__name__}")


def _number(column: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(column, f"must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise RowError(column, f"must be a finite number, got {value}")
    return float(value)


def _as_list(column: str, value: Any) -> list:
    """A cell that may hold one value or several: a list, a JSON array string, or a single value."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError(column, "looks like a JSON list but does not parse") from None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise RowError(column, "is an empty list")
    if len(items) > MAX_INPUTS_PER_CELL:
        raise RowError(column, f"holds more than {MAX_INPUTS_PER_CELL} values")
    return items


def resolve_uri(column: str, value: Any, base: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RowError(column, "must be a URI or path string")
    if "\x00" in value or len(value) > 4096:
        raise RowError(column, "is not a valid URI or path")
    value = value.strip()
    if URI_SCHEME.match(value) or value.startswith("/") or not base:
        return value
    return posixpath.join(base, value)  # relative paths are relative to the manifest's folder


def _params(row: dict, spec: Spec) -> dict[str, Any]:
    """Spec defaults overlaid with the row's values, checked by the same model that checks spec defaults."""
    allowed = COMMON_PARAMS | TASK_PARAMS[spec.task]
    merged = {k: v for k, v in spec.defaults.model_dump().items() if v is not None and k in allowed}
    for column in ("prompt", "negative_prompt"):
        value = row.get(column)
        if value is None:
            continue
        if not isinstance(value, str):
            raise RowError(column, f"must be a string, got {type(value).__name__}")
        if len(value) > MAX_PROMPT_CHARS:
            raise RowError(column, f"longer than {MAX_PROMPT_CHARS} characters")
        merged[column] = value
    for column in INT_COLUMNS + FLOAT_COLUMNS:
        value = row.get(column)
        if column == "seed" or value is None:
            continue
        if column not in allowed:
            if column in ("width", "height") and spec.task == "img2img":
                raise RowError(column, "img2img renders at the size of `image`; resize the input instead")
            continue
        merged[column] = _integral(column, value) if column in INT_COLUMNS else _number(column, value)
    try:
        Params.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise RowError(str(first["loc"][0]), first["msg"].lower()) from None
    for column in ("width", "height"):
        if column in merged and merged[column] % SIZE_FACTOR:
            raise RowError(column, f"must be a multiple of {SIZE_FACTOR}, got {merged[column]}")
    merged.setdefault("prompt", "")
    if spec.task == "video" and merged.get("num_images", 1) != 1:
        raise RowError("num_images", "video specs render one video per row")
    return merged


def _ip_scales(row: dict, spec: Spec) -> list:
    value = row.get("ip_scale")
    if value is None:
        return [adapter.scale for adapter in spec.ip_adapters]
    items = _as_list("ip_scale", value)
    if len(items) == 1 and len(spec.ip_adapters) > 1:
        items = items * len(spec.ip_adapters)
    if len(items) != len(spec.ip_adapters):
        raise RowError("ip_scale", f"has {len(items)} values for {len(spec.ip_adapters)} IP-Adapters")
    scales = [_number("ip_scale", item) for item in items]
    if any(not 0.0 <= s <= 10.0 for s in scales):
        raise RowError("ip_scale", "values must lie in [0, 10]")
    return scales


def _inputs(row: dict, spec: Spec, base: str) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    used = spec.required_columns | {"ip_mask"}
    for column in INPUT_COLUMNS:
        value = row.get(column)
        if value is None:
            if column in spec.required_columns:
                raise RowError(column, f"required by spec {spec.name!r}")
            continue
        if column not in used:
            continue
        if column in ("ip_image", "ip_mask"):
            inputs[column] = [resolve_uri(column, item, base) for item in _as_list(column, value)]
        else:
            inputs[column] = resolve_uri(column, value, base)
    if "ip_mask" in inputs:
        if "ip_image" not in spec.image_columns:
            raise RowError("ip_mask", "the spec has no IP-Adapter fed by ip_image to mask")
        if len(inputs["ip_mask"]) != len(inputs["ip_image"]):
            raise RowError("ip_mask", f"needs one mask per ip_image ({len(inputs['ip_image'])})")
    return inputs


def resolve_row(row: dict, index: int, registry: SpecRegistry, base: str = "") -> Job:
    """Check one row and resolve it into a job; raises RowProblems listing every column at fault."""
    problems: list[RowError] = []

    def attempt(check, *args):
        try:
            return check(*args)
        except RowError as exc:
            problems.append(exc)
            return None

    row_id = attempt(check_id, row.get("id"))
    spec = attempt(_spec_of, row, registry)
    seed = attempt(_seed_of, row, row_id)
    if spec is not None:
        params = attempt(_params, row, spec)
        scales = attempt(_ip_scales, row, spec)
        inputs = attempt(_inputs, row, spec, base)
    if problems:
        raise RowProblems(problems)
    params["ip_adapter_scale"] = scales
    return Job(
        id=row_id,
        spec=spec.name,
        index=index,
        seed=seed,
        params=params,
        inputs=inputs,
        extra={k: _jsonable(v) for k, v in row.items() if k not in KNOWN_COLUMNS},
    )


def _spec_of(row: dict, registry: SpecRegistry) -> Spec:
    name = row.get("spec")
    if not isinstance(name, str) or not name:
        raise RowError("spec", "required, the name of a spec")
    if name not in registry:
        raise RowError("spec", f"unknown spec {name!r}")
    return registry.get(name)


def _seed_of(row: dict, row_id: str | None) -> int:
    seed = row.get("seed")
    if seed is None:
        return default_seed(row_id or "")
    seed = _integral("seed", seed)
    if not 0 <= seed <= MAX_SEED:
        raise RowError("seed", f"must lie in [0, 2**63 - 1], got {seed}")
    return seed


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return str(value)


def resolve_rows(rows: Iterable[dict], registry: SpecRegistry, base: str = "") -> tuple[list[Job], list[tuple[int, list[Problem]]]]:
    """Resolve every row. Returns the jobs and, per bad row, its manifest index and problems.

    Rows sharing an id all fail: their outputs and metadata record would collide, and which one was meant
    cannot be known.
    """
    jobs: list[Job] = []
    bad: dict[int, list[Problem]] = {}
    indexes: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        label = row_label(row, index)
        if not label.startswith("#"):
            indexes.setdefault(label, []).append(index)
        try:
            jobs.append(resolve_row(row, index, registry, base))
        except RowProblems as exc:
            bad[index] = [Problem(label, e.column, e.reason) for e in exc.errors]
    for row_id, where in indexes.items():
        if len(where) > 1:
            reason = f"duplicate id (manifest rows {', '.join(str(i) for i in where)})"
            for index in where:
                bad.setdefault(index, []).insert(0, Problem(row_id, "id", reason))
    jobs = [job for job in jobs if job.index not in bad]
    return jobs, sorted(bad.items())
    return jobs, bad


def resolve_manifest(manifest: Manifest, registry: SpecRegistry):
    """resolve_rows over a manifest, relative input paths taken from the manifest's folder."""
    return resolve_rows(manifest.iter_rows(), registry, manifest.base)
