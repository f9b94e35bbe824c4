"""Untrusted text: ids never address a path outside --out (and ordinary ids are accepted); specs are data
(safe YAML, strict models)."""

from __future__ import annotations

import posixpath

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ipaflow.core.problems import RowFailed
from ipaflow.specs.registry import SpecError, parse_spec
from ipaflow.specs.rows import check_id

BAD_IDS = ["..", "../x", "a/../../x", "/etc/passwd", "a/b", "a\\b", "..\\x", "C:\\x", "C:x", ".hidden", ".", "",
           "con", "NUL", "nul.png", "Com1.txt", "lpt9", "a\x00b", "a b", "tab\tid", "é", "x" * 129, "~root", "$HOME"]


@pytest.mark.parametrize("value", BAD_IDS)
def test_ids_that_could_leave_the_output_folder_are_refused(value):
    with pytest.raises(RowFailed) as caught:
        check_id(value)
    assert caught.value.column == "id"


def _outputs_stay_inside(row_id: str, num_images: int) -> None:
    from ipaflow.specs.outputs import output_paths
    from ipaflow.specs.registry import SpecRegistry
    from ipaflow.specs.rows import Job

    job = Job(id=row_id, spec="sdxl-text2img", index=0, seed=0, params={"num_images": num_images}, inputs={})
    for relative in output_paths(job, SpecRegistry().get("sdxl-text2img")):
        path = posixpath.normpath(posixpath.join("/out", relative))
        assert path.startswith("/out/images/") and path.count("/") == 3, (row_id, relative)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=140), st.text(alphabet="./\\-_aZ0:~", max_size=12)), st.integers(1, 3))
def test_every_accepted_id_names_files_inside_out(value, num_images):
    try:
        row_id = check_id(value)
    except RowFailed:
        return  # refusing is always safe; test_ordinary_ids_are_accepted keeps the check from refusing too much
    _outputs_stay_inside(row_id, num_images)


ORDINARY_ID = st.text(alphabet="abcXYZ019_-.", min_size=1, max_size=128).filter(
    lambda v: not v.startswith(".") and v.split(".", 1)[0].lower() not in {"con", "prn", "aux", "nul"})


@settings(max_examples=300, deadline=None)
@given(ORDINARY_ID, st.integers(1, 3))
def test_ordinary_ids_are_accepted(value, num_images):
    """Letters, digits, '.', '_' and '-', not starting with a dot: every such id is usable (and stays inside)."""
    assert check_id(value) == value
    _outputs_stay_inside(value, num_images)


def test_spec_yaml_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    text = f"name: evil\ntask: text2img\nmodel: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(SpecError, match=r"evil.yaml: not valid YAML \(could not determine a constructor .* line 3"):
        parse_spec(text, "evil.yaml")
    assert not marker.exists()
    yaml.unsafe_load(text)  # the payload is live: an unsafe loader would have run it
    assert marker.exists()


def test_spec_unknown_keys_are_errors():
    text = ("name: typo\ntask: text2img\nmodel: a/b\nip_adapters: [{model: h94/IP-Adapter, weight_name: a.bin, "
            "scael: 0.5}]\ndefaults: {num_steps: 4}\n")
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "typo.yaml")
    message = str(caught.value)
    assert "ip_adapters.0.scael: Extra inputs are not permitted" in message
    assert "defaults.num_steps: Extra inputs are not permitted" in message



@pytest.mark.parametrize("name", ["nl\n", "ok\n", "a b", "UPPER", ".x", ""])
def test_spec_names_are_matched_whole(name):
    text = yaml.safe_dump({"name": name, "task": "text2img", "model": "a/b",
                           "ip_adapters": [{"model": "h94/IP-Adapter", "weight_name": "a.bin"}]})
    with pytest.raises(SpecError, match="name: Value error, spec names are"):
        parse_spec(text, "x.yaml")


@pytest.mark.parametrize("value", ["nl\n", "CON\n", "a\n"])
def test_ids_with_a_trailing_newline_are_refused(value):
    with pytest.raises(RowFailed):
        check_id(value)
