"""A weights file's structure checked in a few bytes (``tasks.model_files.weights_problem``): whole, truncated,
not a safetensors file, not a PyTorch checkpoint, missing."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from ipaflow.tasks.model_files import weights_problem


def test_a_safetensors_file_whole_truncated_text_and_missing(tmp_path):
    whole = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(64, 64), "b": torch.zeros(8)}, str(whole))
    assert weights_problem(whole) is None
    data = whole.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:len(data) // 2])
    assert weights_problem(cut) == f"truncated ({len(data) // 2} of {len(data)} bytes)"
    header_cut = tmp_path / "header.safetensors"
    header_cut.write_bytes(data[:40])
    assert weights_problem(header_cut).startswith("truncated (40 bytes; its header alone is ")
    text = tmp_path / "text.safetensors"
    text.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")  # an LFS pointer
    assert weights_problem(text) == "not a safetensors file (it does not start with a header length)"
    assert weights_problem(tmp_path / "gone.safetensors") == "missing"


def test_a_pytorch_file_whole_truncated_and_text(tmp_path):
    whole = tmp_path / "w.bin"
    torch.save({"a": torch.ones(64, 64)}, whole)
    assert weights_problem(whole) is None
    cut = tmp_path / "cut.bin"
    cut.write_bytes(whole.read_bytes()[:2000])
    assert weights_problem(cut) == "truncated (2000 bytes: its zip directory is missing)"
    text = tmp_path / "text.bin"
    text.write_text("<html>404</html>")
    assert weights_problem(text) == "not a PyTorch checkpoint"
