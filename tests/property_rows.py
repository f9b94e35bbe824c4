"""Hypothesis strategies for manifest rows of valid and invalid values (shared by the unit and e2e property
tests)."""

from __future__ import annotations

from hypothesis import strategies as st

from ipaflow.specs.registry import SpecRegistry

REGISTRY = SpecRegistry()
SPECS = ["sdxl-text2img", "sdxl-img2img", "sdxl-inpaint", "animatediff-video", "sdxl-multi-style-face",
         "sd15-controlnet-depth", "lcm-instant", "nope", ""]
FILES = ["good.png", "missing.png", "corrupt.png", "empty.png", "style", "empty-dir", "[bad", "/abs/nope.png",
         "memory://user:pw@host/x.png"]

anything = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12),
    st.sampled_from(["nan", "3", "1e400", "\ud800", " 7 ", "[1, 2]"]), st.lists(st.integers(-2, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
ids = st.one_of(st.sampled_from(["a", "b", "row.1", "../up", "/abs", "con", "", ".h", "a/b", "a-0"]), anything)
files = st.one_of(st.sampled_from(FILES), st.lists(st.sampled_from(FILES), max_size=3), anything)
numbers = st.one_of(st.sampled_from([1, 2, 8, 64, 0.5, 1.0, -1, 0]), anything)


INPUT_COLUMNS = ("image", "mask", "control_image", "ip_image", "style_folder", "ip_mask")
NUMBER_COLUMNS = ("seed", "num_inference_steps", "guidance_scale", "strength", "width", "height", "num_frames",
                  "num_images", "controlnet_conditioning_scale", "ip_scale")
VALID = {"spec": "sdxl-text2img", "prompt": "a picture", "ip_image": "good.png", "num_inference_steps": 1}


@st.composite
def rows(draw, specs=st.one_of(st.sampled_from(SPECS), anything), numbers=numbers, max_rows=6):
    """Manifest rows: each either a valid row with up to two cells changed, or every column drawn from valid
    and invalid values; a missing cell is a null or no key at all."""
    strategies = {"spec": specs, "prompt": st.one_of(st.text(max_size=30), anything),
                  "negative_prompt": st.one_of(st.text(max_size=30), anything), "extra": anything,
                  **dict.fromkeys(INPUT_COLUMNS, files), **dict.fromkeys(NUMBER_COLUMNS, numbers)}
    out = []
    for _ in range(draw(st.integers(1, max_rows))):
        if draw(st.booleans()):
            row = {"id": draw(ids), **VALID}
            changed = draw(st.lists(st.sampled_from(sorted(strategies)), max_size=2))
        else:
            row = {"id": draw(ids)}
            changed = sorted(strategies)
        row.update({column: draw(strategies[column]) for column in changed})
        out.append({key: value for key, value in row.items()
                    if value is not None or key in ("id", "spec") or draw(st.booleans())})
    return out
