"""From manifest rows to jobs: each row checked against its spec and resolved into what to render.

Everything here is static (no I/O, no GPU): it decides whether a row is well formed and what parameters it
renders with. Every problem of a row is collected (``ipaflow.core.problems``), each naming the column and the
reason; which parameters and inputs a row's task takes comes from its task profile (``specs.profiles``).
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ipaflow.core.problems import FailedRow, Problem, RowFailed
from ipaflow.specs.manifest import FLOAT_COLUMNS, INPUT_COLUMNS, INT_COLUMNS, KNOWN_COLUMNS, Undecodable
from ipaflow.specs.outputs import collision_key, extension, job_stems
from ipaflow.specs.registry import SpecRegistry
from ipaflow.specs.spec import Params, Spec
from ipaflow.specs.templates import TEMPLATED, fill, is_template

ROW_ID_PATTERN = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}"  # matched whole; specs.checks applies it to whole columns
ROW_ID = re.compile(ROW_ID_PATTERN)
# Names Windows reserves; an id must be usable as a file name on every filesystem users sync outputs to.
RESERVED_IDS = frozenset({"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)})
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 100_000
MAX_INPUTS_PER_CELL = 64
URI_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")

# Parameters that shape a pipeline call: rows share a call only when these are equal.
CALL_PARAMS = ("num_inference_steps", "guidance_scale", "strength", "width", "height", "num_frames",
               "controlnet_conditioning_scale")


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

    @property
    def solo(self) -> bool:
        """Rows rendered in a call of their own: several images per prompt, or regional masks."""
        return self.num_images > 1 or "ip_mask" in self.inputs

    def call_group(self) -> str:
        """Rows of one spec with different groups never share a pipeline call; rows of one group do, unless
        their inputs' shapes differ (``ipaflow.tasks.render.batch_key`` adds those). Sorting by it puts rows
        that can share a call next to each other."""
        return json.dumps([self.id if self.solo else "", [self.params.get(name) for name in CALL_PARAMS],
                           self.params.get("negative_prompt") is None, self.params.get("ip_adapter_scale")],
                          sort_keys=True)


def default_seed(row_id: str) -> int:
    """The seed of a row without one: stable across runs and machines, derived from the id alone."""
    return int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:4], "big")


def row_label(row: dict, index: int) -> str:
    """How problems name a row: its id when that is a valid id, else ``#<index>`` (0-based manifest row)."""
    try:
        return check_id(row.get("id"))
    except RowFailed:
        return f"#{index}"


def _shown(value: Any, limit: int = 60) -> str:
    """A cell's value for an error message: repr (one line, control characters escaped), shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_id(value: Any) -> str:
    """The row's id; it names the output files, so it can never address a path outside ``--out``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise RowFailed.at("id", f"required, a non-empty string (got {_shown(value)})")
    if not ROW_ID.fullmatch(value):
        raise RowFailed.at("id", f"{_shown(value)} must match [A-Za-z0-9._-]{{1,128}} and not start with '.'")
    if value.split(".", 1)[0].lower() in RESERVED_IDS:
        raise RowFailed.at("id", f"{value!r} is a reserved file name")
    return value


def _from_text(value: Any) -> Any:
    """A number written as text (every cell of a CSV column holding one bad cell) as that number."""
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value.strip())
            except ValueError:
                pass
    return value


def integral(column: str, value: Any) -> int:
    """A cell as an int (a whole float, or text of one, too), else RowFailed naming ``column``."""
    value = _from_text(value)
    if isinstance(value, bool):
        raise RowFailed.at(column, "must be an integer, not a boolean")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RowFailed.at(column, f"must be a finite integer, got {value}")
        if not value.is_integer():
            raise RowFailed.at(column, f"must be an integer, got {value}")
        return int(value)
    if isinstance(value, int):
        return value
    raise RowFailed.at(column, f"must be an integer, got {_shown(value)}")


def _number(column: str, value: Any) -> float:
    value = _from_text(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowFailed.at(column, f"must be a number, got {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        number = math.inf
    if not math.isfinite(number):
        raise RowFailed.at(column, f"must be a finite number, got {_shown(value)}")
    return number


def _is_list_cell(value: Any) -> bool:
    """Whether a cell holds a list (or a JSON list, as text) rather than one value."""
    return isinstance(value, (list, tuple)) or (isinstance(value, str) and value.lstrip().startswith("["))


def _as_list(column: str, value: Any) -> list:
    """A cell that may hold one value or several: a list, a JSON array string, or a single value."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowFailed.at(column, "looks like a JSON list but does not parse") from None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise RowFailed.at(column, "is an empty list")
    if len(items) > MAX_INPUTS_PER_CELL:
        raise RowFailed.at(column, f"holds more than {MAX_INPUTS_PER_CELL} values")
    return items


def resolve_uri(column: str, value: Any, base: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RowFailed.at(column, f"must be a URI or path string, got {_shown(value)}")
    if "\x00" in value or len(value) > 4096 or _not_unicode(value):
        raise RowFailed.at(column, "is not a valid URI or path")
    value = value.strip()
    if URI_SCHEME.match(value) or value.startswith("/") or not base:
        return value
    return posixpath.join(base, value)  # relative paths are relative to the manifest's folder


def _text(column: str, value: Any) -> str:
    if not isinstance(value, str):
        raise RowFailed.at(column, f"must be a string, got {_shown(value)}")
    if _not_unicode(value):
        raise RowFailed.at(column, "is not valid Unicode text (it holds a lone surrogate)")
    if len(value) > MAX_PROMPT_CHARS:
        raise RowFailed.at(column, f"longer than {MAX_PROMPT_CHARS} characters")
    return value


def _not_unicode(text: str) -> bool:
    """JSON can escape half a surrogate pair (``"\\ud800"``), which no UTF-8 file, image chunk or record holds."""
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _param(column: str, value: Any) -> Any:
    if column in ("prompt", "negative_prompt"):
        return _text(column, value)
    return integral(column, value) if column in INT_COLUMNS else _number(column, value)


def _params(row: dict, spec: Spec) -> dict[str, Any]:
    """Spec defaults overlaid with the row's values, checked by the same model that checks spec defaults.
    Raises RowFailed naming every column at fault."""
    profile = spec.profile
    merged = {k: v for k, v in spec.default_params().items() if k in profile.all_params}
    problems: list[Problem] = []
    for column in ("prompt", "negative_prompt") + INT_COLUMNS + FLOAT_COLUMNS:
        value = row.get(column)
        if column == "seed" or value is None:
            continue
        try:
            if column in profile.all_params:
                merged[column] = _param(column, value)
            elif reason := profile.refuses(column, value):
                raise RowFailed.at(column, reason)
        except RowFailed as exc:
            problems.extend(exc.problems)
    try:
        Params.model_validate(merged)
    except ValidationError as exc:
        for item in exc.errors():
            column = str(item["loc"][0])
            problems.append(Problem(column, f"{item['msg'].lower()}, got {_shown(item['input'])}"))
    steps, strength = merged.get("num_inference_steps"), merged.get("strength")
    if not problems and steps is not None and strength is not None:
        if problem := steps_problem(spec, steps, strength, given=row):
            problems.append(problem)
    for column in TEMPLATED:
        if is_template(merged.get(column)):
            try:
                merged[column] = _text(column, fill(column, merged[column], row))
            except RowFailed as exc:
                problems.extend(exc.problems)
    if problems:
        raise RowFailed(problems)
    merged.setdefault("prompt", "")
    return merged


def templates_of(row: dict, spec: Spec) -> dict[str, str]:
    """The prompt templates a row renders with (its own cell, else the spec's default), as the record keeps
    them: ``prompt_template``, ``negative_prompt_template``."""
    defaults = spec.default_params()
    found = {}
    for column in TEMPLATED:
        text = row.get(column) if row.get(column) is not None else defaults.get(column)
        if is_template(text):
            found[f"{column}_template"] = text
    return found


def steps_problem(spec: Spec, steps: int, strength: float, given: dict) -> Problem | None:
    """Why a call with ``steps`` and ``strength`` would run no denoising step (diffusers fails such a call
    deep inside: "cannot reshape tensor of 0 elements"); named after the column ``given`` holds, steps first."""
    if spec.profile.denoising_steps(steps, strength) >= 1:
        return None
    column = "strength" if given.get("strength") is not None and given.get("num_inference_steps") is None \
        else "num_inference_steps"
    return Problem(column, f"{steps} step(s) x strength {strength:g} runs no denoising step (task {spec.task!r} "
                           "runs int(num_inference_steps x strength)); raise num_inference_steps or strength")


def _ip_scales(row: dict, spec: Spec) -> list:
    value = row.get("ip_scale")
    if value is None:
        return [adapter.scale for adapter in spec.ip_adapters]
    count = len(spec.ip_adapters)
    items = _as_list("ip_scale", value)
    if not _is_list_cell(value):
        items = items * count  # one number scales every adapter
    if len(items) != count:
        raise RowFailed.at("ip_scale", f"a list of {len(items)} values for {count} IP-Adapter(s); give one per adapter")
    scales = [_number("ip_scale", item) for item in items]
    if any(not 0.0 <= s <= 10.0 for s in scales):
        raise RowFailed.at("ip_scale", "values must lie in [0, 10]")
    return scales


def _input(column: str, value: Any, base: str) -> str | list[str]:
    if column in ("ip_image", "ip_mask"):
        return [resolve_uri(column, item, base) for item in _as_list(column, value)]
    return resolve_uri(column, value, base)


def _inputs(row: dict, spec: Spec, base: str) -> dict[str, Any]:
    """The row's input URIs by column; raises RowFailed naming every missing or malformed one. Input
    columns the spec does not read are ignored, like unused parameters."""
    inputs: dict[str, Any] = {}
    problems: list[Problem] = []
    required = spec.required_columns
    for column in INPUT_COLUMNS:
        value = row.get(column)
        if value is None:
            if column in required:
                problems.append(Problem(column, f"required by spec {spec.name!r}: {required[column]}"))
        elif column in required or column == "ip_mask":
            try:
                inputs[column] = _input(column, value, base)
            except RowFailed as exc:
                problems.extend(exc.problems)
    if problems:
        raise RowFailed(problems)
    if "ip_mask" in inputs:
        if "ip_image" not in spec.image_columns:
            raise RowFailed.at("ip_mask", "the spec has no IP-Adapter fed by ip_image to mask")
        if len(inputs["ip_mask"]) != len(inputs["ip_image"]):
            raise RowFailed.at("ip_mask", f"needs one mask per ip_image ({len(inputs['ip_image'])})")
    return inputs


def resolve_row(row: dict, index: int, registry: SpecRegistry, base: str = "") -> Job:
    """Check one row and resolve it into a job; raises RowFailed listing every column at fault."""
    undecodable = [Problem(column, value.reason()) for column, value in row.items() if isinstance(value, Undecodable)]
    if undecodable:  # bytes that are not text: what the row's other cells mean cannot be trusted either
        raise RowFailed(undecodable)
    problems: list[Problem] = []

    def attempt(check, *args):
        try:
            return check(*args)
        except RowFailed as exc:
            problems.extend(exc.problems)
        return None

    row_id = attempt(check_id, row.get("id"))
    spec = attempt(_spec_of, row, registry)
    seed = attempt(_seed_of, row, row_id)
    if spec is not None:
        params = attempt(_params, row, spec)
        scales = attempt(_ip_scales, row, spec)
        inputs = attempt(_inputs, row, spec, base)
    if problems:
        raise RowFailed(problems)
    params["ip_adapter_scale"] = scales
    return Job(
        id=row_id,
        spec=spec.name,
        index=index,
        seed=seed,
        params=params,
        inputs=inputs,
        extra={**passthrough_of(row), **templates_of(row, spec)},
    )


def passthrough_of(row: dict) -> dict[str, Any]:
    """A row's passthrough cells (the columns ipaflow gives no meaning), as the metadata keeps them."""
    return {k: storable(v) for k, v in row.items() if k not in KNOWN_COLUMNS}


def _spec_of(row: dict, registry: SpecRegistry) -> Spec:
    name = row.get("spec")
    if not isinstance(name, str) or not name:
        raise RowFailed.at("spec", f"required, the name of a spec (got {_shown(name)})")
    if name not in registry:
        raise RowFailed.at("spec", f"unknown spec {_shown(name)}; `ipaflow specs list` shows the known ones")
    return registry.get(name)


def _seed_of(row: dict, row_id: str | None) -> int:
    seed = row.get("seed")
    if seed is None:
        return default_seed(row_id or "")
    seed = integral("seed", seed)
    if not 0 <= seed <= MAX_SEED:
        raise RowFailed.at("seed", f"must lie in [0, 2**63 - 1], got {seed}")
    return seed


def storable(value: Any) -> Any:
    """A passthrough cell as the metadata can keep it: unchanged when it is a plain scalar or list (finite
    numbers, 64-bit integers, valid Unicode), mappings and lists with their items made so, anything else as
    text. A NaN, a huge integer or half a surrogate pair must not fail the run; mappings stay mappings here
    (the metadata stores them as JSON text once: ``ipaflow.tasks.metadata_schema.passthrough_column``)."""
    if _plain(value):
        return value
    if isinstance(value, dict):
        return {storable(str(k)): storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable(v) for v in value]
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return not _not_unicode(value)
    return isinstance(value, list) and all(_plain(item) for item in value)


def spec_name_of(row: dict, registry: SpecRegistry) -> str | None:
    """The row's spec name when it names a known spec (so that a failed row is reported under its spec)."""
    name = row.get("spec")
    return name if isinstance(name, str) and name in registry else None


def colliding_outputs(jobs: list[Job], registry: SpecRegistry,
                      where: Callable[[int], str | None] | None = None) -> dict[int, list[Problem]]:
    """Rows with distinct ids that would still write the same output: ``a`` with two images writes ``a-0``,
    which is also the output of a row ``a-0``. Both fail; otherwise one would silently overwrite the other.
    Outputs are compared by stem (``specs.outputs.collision_key``), whatever their folder, format or layout.
    ``where`` names a row's place in a folder manifest (file and row) instead of its manifest index."""
    writers: dict[str, list[tuple[Job, str]]] = {}
    for job in jobs:
        spec = registry.get(job.spec)
        for stem in job_stems(job, spec):
            writers.setdefault(collision_key(stem), []).append((job, f"{stem} ({extension(spec).lstrip('.')})"))
    bad: dict[int, list[Problem]] = {}
    for owners in writers.values():
        if len({job.index for job, _ in owners}) == 1:
            continue
        for job, shown in owners:
            others = [other for other, _ in owners if other is not job]
            places = [where(other.index) for other in others] if where else []
            if places and None not in places:
                written = ", ".join(f"{place} ({other.id})" for place, other in zip(places, others))
            else:
                written = "manifest row " + ", ".join(f"{other.index} ({other.id})" for other in others)
            bad.setdefault(job.index, []).append(Problem("id", f"its output {shown} is also written by {written}; "
                                                               "rename one"))
    return bad


def duplicate_problem(indexes: list[int], ids: list[str] | None = None, where: list[str] | None = None) -> Problem:
    """The problem of rows sharing an id (``ids``: theirs, when they may differ in case; ``where``: the rows'
    places in a folder manifest, file and row, shown instead of their manifest indexes)."""
    rows = f"({', '.join(where)})" if where else f"(manifest rows {', '.join(str(i) for i in indexes)})"
    spelled = list(dict.fromkeys(ids or []))
    if len(spelled) > 1:
        return Problem("id", f"duplicate id: {', '.join(map(repr, spelled))} differ only in case {rows}", shared=True)
    return Problem("id", f"duplicate id {rows}", shared=True)


def resolve_rows(rows: Iterable[dict], registry: SpecRegistry, base: str = "") -> tuple[list[Job], list[FailedRow]]:
    """Resolve every row. Returns the jobs and the failed rows, in manifest order.

    This is the reference: it holds every row. Runs stream instead (``specs.stream``), with the same rules and
    the same messages; a property test (tests/unit/test_stream_properties.py) compares the two.

    Rows sharing an id all fail (ids compared by ``specs.outputs.collision_key``: ``A`` and ``a`` are the same):
    their outputs and metadata record would collide, and which one was meant cannot be known. So do rows whose
    output files would collide.
    """
    jobs: list[Job] = []
    bad: dict[int, list[Problem]] = {}
    labels: dict[int, tuple[str, str | None]] = {}
    indexes: dict[str, list[int]] = {}
    spelled: dict[int, str] = {}
    for index, row in enumerate(rows):
        label = row_label(row, index)
        if not label.startswith("#"):
            indexes.setdefault(collision_key(label), []).append(index)
            spelled[index] = label
        try:
            jobs.append(resolve_row(row, index, registry, base))
        except RowFailed as exc:
            bad[index] = list(exc.problems)
            labels[index] = (label, spec_name_of(row, registry))
    for where in indexes.values():
        if len(where) > 1:
            for index in where:
                bad.setdefault(index, []).insert(0, duplicate_problem(where, [spelled[i] for i in where]))
    by_index = {job.index: job for job in jobs}
    for index, problems in colliding_outputs([j for j in jobs if j.index not in bad], registry).items():
        bad[index] = problems
    for index in bad:
        if index in by_index:
            labels[index] = (by_index[index].id, by_index[index].spec)
    failed = [FailedRow(row=labels[i][0], problems=tuple(bad[i]), index=i, spec=labels[i][1]) for i in sorted(bad)]
    return [job for job in jobs if job.index not in bad], failed
