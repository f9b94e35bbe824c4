"""Memory savers only when needed and the batch size from free GPU memory: the decisions, from given byte
figures, and the traced activation sizes they rest on (shape-true SD1.5 / SDXL on the meta device: no
weights, no GPU)."""

from __future__ import annotations

import types

import pytest
import torch

from ipaflow.specs.spec import Spec
from ipaflow.tasks import memory
from ipaflow.tasks.memory import GiB, MiB, RowShape, decide_offload, decide_vae, fit_rows


def test_offload_auto_decides_from_the_free_memory():
    weights, row = 8 * GiB, 3 * GiB  # SDXL-sized: fits an 80 GB card, not a 12 GB one
    assert decide_offload("auto", weights, row, 79 * GiB).on is False
    small = decide_offload("auto", weights, row, 11 * GiB)
    assert small.on is True and "does not fit in 11.0 GiB free" in small.reason
    edge = weights + memory.SAFETY * row + memory.RESERVE
    assert decide_offload("auto", weights, row, int(edge) + 1).on is False
    assert decide_offload("auto", weights, row, int(edge) - 1).on is True


def test_offload_explicit_settings_are_obeyed_and_nothing_offloads_without_a_gpu():
    assert decide_offload(True, GiB, GiB, 500 * GiB).on is True
    assert decide_offload(False, 100 * GiB, GiB, 1 * GiB).on is False
    assert decide_offload("auto", 100 * GiB, GiB, None) == memory.Decision(False, "no GPU")
    assert decide_offload(True, GiB, GiB, None).on is False


def test_fit_rows_takes_the_largest_batch_that_fits_within_the_cap():
    per_row = GiB
    need = lambda rows: rows * per_row  # noqa: E731
    room = lambda rows: int(memory.SAFETY * rows * per_row + memory.RESERVE)  # noqa: E731
    assert fit_rows(32, need, room(10)) == 10
    assert fit_rows(32, need, room(10) - 1) == 9
    assert fit_rows(8, need, room(10)) == 8  # --batch-size caps it
    assert fit_rows(8, need, 1) == 1  # nothing fits: one row, the OOM split is the safety net
    assert fit_rows(8, need, None) == 8  # no GPU: the cap


def test_vae_savers_slice_when_the_batch_does_not_fit_and_tile_when_one_image_does_not():
    batch, one, tile = 16 * GiB, 2 * GiB, GiB // 2
    roomy, mid, tight = 100 * GiB, 8 * GiB, 2 * GiB
    assert decide_vae("auto", "auto", batch, one, tile, roomy) == (False, False)
    assert decide_vae("auto", "auto", batch, one, tile, mid) == (True, False)
    assert decide_vae("auto", "auto", batch, one, tile, tight) == (True, True)
    assert decide_vae(False, "auto", batch, one, tile, tight) == (False, True)  # no slicing: tile the batch
    assert decide_vae(True, False, batch, one, tile, roomy) == (True, False)  # explicit: as given
    assert decide_vae("auto", "auto", batch, one, tile, None) == (False, False)  # no GPU


def test_spec_memory_defaults_to_auto_and_compile_takes_yaml_on_off():
    spec = Spec(name="s", task="text2img", model="m/m",
                ip_adapters=[{"model": "h94/IP-Adapter", "weight_name": "a.bin"}])
    assert (spec.memory.cpu_offload, spec.memory.vae_slicing, spec.memory.vae_tiling, spec.compile) == ("auto",) * 4
    assert spec.model_copy(update={"compile": "off"}).fingerprint() == spec.fingerprint()  # not an output's key
    payload = spec.model_dump()
    assert Spec(**{**payload, "compile": False}).compile == "off"  # YAML's bare `off`
    assert Spec(**{**payload, "compile": True}).compile == "on"
    assert Spec(**{**payload, "memory": {"cpu_offload": True}}).memory.cpu_offload is True
    with pytest.raises(ValueError):
        Spec(**{**payload, "compile": "sometimes"})


# ------------------------------------------------------------------------------ traced activation bytes
def _meta_pipe(unet_config: dict, vae_config: dict, sdxl: bool = False):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = torch.nn.Module.to(UNet2DConditionModel(**unet_config), torch.float16)
        vae = torch.nn.Module.to(AutoencoderKL(**vae_config), torch.float16)
    pipe = types.SimpleNamespace(unet=unet, vae=vae, vae_scale_factor=8, components={"unet": unet, "vae": vae})
    if sdxl:
        pipe.upcast_vae = lambda: None  # what marks the SDXL pipelines, which decode in float32
    return pipe


@pytest.fixture(scope="module")
def sd15():
    from ipaflow.tasks.zoo.full_size import UNET, VAE

    return _meta_pipe(UNET, VAE)


def test_traced_sd15_activations_are_real_size_and_linear(sd15):
    """Shape-true SD1.5 at 512x512 in float16: ~65 MiB per latent sample in the UNet, ~384 MiB per decoded
    image (the VAE's last blocks at full resolution dominate a row)."""
    one = memory.denoiser_bytes(sd15, 2, 512, 512, None, torch.float16)
    eight = memory.denoiser_bytes(sd15, 8, 512, 512, None, torch.float16)
    assert 100 * MiB < one < 160 * MiB and eight == pytest.approx(4 * one, rel=0.01)
    decode = memory.decode_bytes(sd15, 1, 512, 512, torch.float16)
    assert 300 * MiB < decode < 450 * MiB
    assert memory.decode_bytes(sd15, 1, 1024, 1024, torch.float16) == pytest.approx(4 * decode, rel=0.02)


def test_batch_rows_follow_the_free_memory(sd15, monkeypatch):
    plan = memory.MemoryPlan(sd15, torch.device("cuda"), torch.float16)
    shape = RowShape(width=512, height=512)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 120 * GiB)
    assert plan.batch_rows(shape, 32) == 32
    monkeypatch.setattr(memory, "available_bytes", lambda device: 3 * GiB)
    rows = plan.batch_rows(shape, 32)
    assert 1 < rows < 32
    assert memory.SAFETY * plan.need(shape, rows, True) + memory.RESERVE <= 3 * GiB
    assert memory.SAFETY * plan.need(shape, rows + 1, True) + memory.RESERVE > 3 * GiB
    assert plan.vae_savers(shape, rows) == (True, False)  # a whole batch's decode would not fit: one at a time
    plan.correction[shape] = 2.0  # measured peaks twice the traced: smaller batches
    assert plan.batch_rows(shape, 32) < rows
    assert memory.MemoryPlan(sd15, torch.device("cpu"), torch.float32).batch_rows(shape, 32) == 32  # no GPU


def test_sdxl_decodes_in_float32_and_needs_offload_on_a_small_card():
    from ipaflow.tasks.zoo.full_size import SDXL_UNET, SDXL_VAE

    pipe = _meta_pipe(SDXL_UNET, SDXL_VAE, sdxl=True)
    assert memory.decode_dtype(pipe, torch.float16) == torch.float32
    shape = RowShape(width=1024, height=1024)
    plan = memory.MemoryPlan(pipe, torch.device("cuda"), torch.float16)
    row = plan.need(shape, 1, slicing=True)
    weights = memory.pipeline_bytes(pipe)
    assert 4.5 * GiB < weights < 5.5 * GiB  # unet + vae (the encoders are not in this meta pipe)
    assert decide_offload("auto", weights + 3 * GiB, row, 10 * GiB).on is True
    assert decide_offload("auto", weights + 3 * GiB, row, 140 * GiB).on is False
