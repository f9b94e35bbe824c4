"""Row validation across manifest formats: a bad cell fails its own row only, whatever the format; every
problem of a row is listed; rules that depend on the spec (adapter count, task)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ipaflow.flows.validate import validate_manifest
from ipaflow.specs.manifest import ManifestError
from ipaflow.specs.registry import SpecError, parse_spec

ROW = {"spec": "sdxl-text2img", "ip_image": "in.png", "num_inference_steps": 1}


def _problems(path) -> list[str]:
    failed, _ = validate_manifest(str(path), check_inputs=False)
    return [line for row in failed for line in row.lines()]


def test_csv_bad_cell_fails_its_row_only(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,spec,ip_image,num_inference_steps,guidance_scale,seed\n"
        "007,sdxl-text2img,in.png,2,,\n"  # empty cells: the spec's defaults
        "b,sdxl-text2img,in.png,ten,5,\n"
        "c,sdxl-text2img,in.png,3,nan,\n"  # typed "nan": reported, not taken as missing
        "d,sdxl-text2img,in.png,1,7.5,12\n"
    )
    assert _problems(manifest) == [
        "b, num_inference_steps, must be an integer, got 'ten'",
        "c, guidance_scale, must be a finite number, got nan",
    ]


def test_jsonl_column_may_change_type_between_rows(tmp_path):
    manifest = tmp_path / "m.jsonl"
    rows = [{**ROW, "id": "a"}, {**ROW, "id": "b", "num_inference_steps": "ten"}, {**ROW, "id": "c", "seed": "12"}]
    manifest.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    assert _problems(manifest) == ["b, num_inference_steps, must be an integer, got 'ten'"]

    manifest.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(ManifestError, match="line 2 is not valid JSON"):
        validate_manifest(str(manifest), check_inputs=False)


def test_parquet_integer_ids_and_nan(tmp_path):
    table = pa.table({
        "id": [1, 2, 2, 3],
        "spec": ["sdxl-text2img"] * 4,
        "ip_image": ["in.png"] * 4,
        "guidance_scale": [5.0, 5.0, 5.0, float("nan")],
    })
    pq.write_table(table, tmp_path / "m.parquet")
    assert _problems(tmp_path / "m.parquet") == [
        "2, id, duplicate id (manifest rows 1, 2)",
        "2, id, duplicate id (manifest rows 1, 2)",
        "3, guidance_scale, must be a finite number, got nan",
    ]


def test_every_problem_of_a_row_is_listed(tmp_path):
    manifest = tmp_path / "m.jsonl"
    row = {"id": "r", "spec": "sdxl-inpaint", "num_inference_steps": 0, "strength": 2, "seed": -5}
    manifest.write_text(json.dumps(row) + "\n")
    assert [p.split(", ")[1] for p in _problems(manifest)] == [
        "seed", "num_inference_steps", "strength", "image", "mask", "ip_image"]


@pytest.mark.parametrize("ip_scale, problem", [
    (0.4, None),  # one number scales every adapter
    ([0.4, 0.6], None),
    ("[0.4, 0.6]", None),  # a JSON list in a text cell (CSV)
    ([0.4], "ip_scale, a list of 1 values for 2 IP-Adapter(s); give one per adapter"),
    ([0.4, 0.6, 0.1], "ip_scale, a list of 3 values for 2 IP-Adapter(s); give one per adapter"),
    ([0.4, 11], "ip_scale, values must lie in [0, 10]"),
    ([0.4, None], "ip_scale, must be a number, got None"),
])
def test_ip_scale_per_adapter(tmp_path, ip_scale, problem):
    from ipaflow.specs.registry import SpecRegistry
    from ipaflow.specs.rows import resolve_rows

    row = {"id": "r", "spec": "sdxl-multi-style-face", "ip_image": "f.png", "style_folder": "s", "ip_scale": ip_scale}
    jobs, bad = resolve_rows([row], SpecRegistry())
    if problem is None:
        assert len(jobs[0].params["ip_adapter_scale"]) == 2
    else:
        assert [line.split(", ", 1)[1] for line in bad[0].lines()] == [problem]


def test_parameters_a_task_cannot_use(tmp_path):
    from ipaflow.specs.registry import SpecRegistry
    from ipaflow.specs.rows import resolve_rows

    rows = [
        {**ROW, "id": "ignored", "strength": 0.3, "num_frames": 99},  # text2img has no use for them
        {**ROW, "id": "video-one", "spec": "animatediff-video", "num_images": 1},
        {**ROW, "id": "img2img-size", "spec": "sdxl-img2img", "image": "i.png", "height": 64},
    ]
    jobs, bad = resolve_rows(rows, SpecRegistry())
    assert [job.id for job in jobs] == ["ignored", "video-one"]
    assert "strength" not in jobs[0].params and "num_frames" not in jobs[0].params
    assert bad[0].lines() == [
        "img2img-size, height, img2img renders at the size of `image`; resize the input instead"]


def test_spec_defaults_are_checked_like_rows():
    text = ("name: odd\ntask: text2img\nmodel: a/b\nip_adapters: [{model: h94/IP-Adapter, weight_name: a.bin}]\n"
            "defaults: {width: 100, num_inference_steps: 0}\n")
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "odd.yaml")
    assert "defaults.width: Input should be a multiple of 8" in str(caught.value)
    assert "defaults.num_inference_steps: Input should be greater than or equal to 1" in str(caught.value)


def test_a_latin1_byte_in_a_csv_fails_its_row_only(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"id,spec,ip_image,num_inference_steps,prompt,note\n"
                         b"a,sdxl-text2img,in.png,1,caf\xe9 au lait,x\n"  # saved as Latin-1
                         b"b,sdxl-text2img,in.png,1,fine,d\xe9j\xe0 vu\n"
                         b"c,sdxl-text2img,in.png,1,caf\xc3\xa9,ok\n")  # UTF-8
    assert _problems(manifest) == [
        "a, prompt, not UTF-8 text (byte 0xe9 at position 3); save the manifest as UTF-8",
        "b, note, not UTF-8 text (byte 0xe9 at position 1); save the manifest as UTF-8",
    ]


def test_a_repeated_column_name_is_refused(tmp_path):
    (tmp_path / "m.csv").write_text("id,spec,prompt,prompt\na,sdxl-text2img,one,two\n")
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["sdxl-text2img"]), pa.array(["b"])],
                                        names=["id", "spec", "id"]), tmp_path / "m.parquet")
    (tmp_path / "m.jsonl").write_text('{"id": "a", "spec": "sdxl-text2img", "prompt": "one", "prompt": "two"}\n')
    expected = {"m.csv": "column(s) 'prompt' appear more than once; keep one of each",
                "m.parquet": "column(s) 'id' appear more than once; keep one of each",
                "m.jsonl": "line 1: key 'prompt' appears more than once"}
    for name, reason in expected.items():
        with pytest.raises(ManifestError) as caught:
            validate_manifest(str(tmp_path / name), check_inputs=False)
        assert str(caught.value) == f"{tmp_path / name}: {reason}"


def test_a_manifest_that_is_a_fifo_is_refused_at_once(tmp_path):
    import os
    import threading

    os.mkfifo(tmp_path / "m.csv")
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(_refusal(tmp_path / "m.csv")), daemon=True)
    worker.start()
    worker.join(10)
    assert outcome == [f"{tmp_path / 'm.csv'}: cannot read manifest (InputRefused: not a regular file (a FIFO))"]
    (tmp_path / "folder.csv").mkdir()
    assert _refusal(tmp_path / "folder.csv") == f"{tmp_path / 'folder.csv'}: the folder holds no manifest file"


def _refusal(path) -> str | None:
    try:
        validate_manifest(str(path), check_inputs=False)
    except ManifestError as exc:
        return str(exc)
    return None


def test_steps_times_strength_must_run_a_denoising_step(tmp_path):
    """img2img and inpaint run int(num_inference_steps x strength) steps: none fails the call deep in diffusers,
    so the row fails here, named after the column it gave (steps first)."""
    base = {"spec": "sdxl-img2img", "ip_image": "in.png", "image": "init.png"}  # the spec's strength: 0.6
    rows = [{**base, "id": "one-step", "num_inference_steps": 1},
            {**base, "id": "two-steps", "num_inference_steps": 2},
            {**base, "id": "weak", "num_inference_steps": 3, "strength": 0.3},
            {**base, "id": "weak-alone", "strength": 0.01},  # steps: the pipeline's default (judged with it later)
            {**base, "id": "text", "num_inference_steps": 1, "spec": "sdxl-text2img"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    reason = "runs no denoising step (task 'img2img' runs int(num_inference_steps x strength)); raise " \
             "num_inference_steps or strength"
    # weak-alone leaves steps to its pipeline: judged with the pipeline's default where its model is at hand
    # (the tiny zoo, once another test built it), as a render judges it
    from ipaflow.specs.registry import SpecRegistry
    from ipaflow.tasks.call_defaults import call_defaults

    steps = call_defaults(SpecRegistry().get("sdxl-img2img")).get("num_inference_steps")
    judged_with_defaults = [f"weak-alone, strength, {steps} step(s) x strength 0.01 {reason}"] if steps else []
    assert _problems(manifest) == [f"one-step, num_inference_steps, 1 step(s) x strength 0.6 {reason}",
                                   f"weak, num_inference_steps, 3 step(s) x strength 0.3 {reason}",
                                   *judged_with_defaults]
    with pytest.raises(SpecError, match="defaults: 1 step.s. x strength 0.5 runs no denoising step"):
        parse_spec("name: odd\ntask: img2img\nmodel: a/b\nip_adapters: [{model: h94/IP-Adapter, weight_name: w.bin}]\n"
                   "defaults: {num_inference_steps: 1, strength: 0.5}\n", "odd.yaml")
