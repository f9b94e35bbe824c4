"""The specs commands: bundled and user specs listed and shown."""

from __future__ import annotations

from ipaflow.flows.cli import main


def test_specs_list_and_show(capsys):
    assert main(["specs", "list"]) == 0
    listed = capsys.readouterr().out
    for name in ("sdxl-text2img", "sdxl-img2img", "sdxl-inpaint", "animatediff-video", "sd15-full-face",
                 "sd15-plus-face", "sdxl-multi-style-face", "lcm-instant", "sd15-controlnet-depth"):
        assert name in listed
    assert main(["specs", "show", "lcm-instant"]) == 0
    shown = capsys.readouterr().out
    assert "latent-consistency/lcm-lora-sdv1-5" in shown and "LCMScheduler" in shown
    assert main(["specs", "show", "no-such-spec"]) == 2  # nothing ran


def test_user_spec_folder(tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text(
        "name: my-face\ntask: text2img\nmodel: stable-diffusion-v1-5/stable-diffusion-v1-5\n"
        "ip_adapters:\n  - {model: h94/IP-Adapter, subfolder: models, weight_name: ip-adapter_sd15.bin, scale: 0.8}\n"
    )
    assert main(["specs", "list", "--specs", str(tmp_path)]) == 0
    assert "my-face" in capsys.readouterr().out

