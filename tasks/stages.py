"""Where a pipeline call spends its time: the text encoders, the image encoder, the denoiser (UNet or motion
UNet, ControlNet) and the VAE decoder, measured with forward hooks.

On a GPU the hooks record CUDA events, so the figures are device time and the clock adds no synchronisation;
they are read once the call is over (the call itself ends by copying its images to the host). On a CPU the
hooks read the host clock. The hooks cost a flag test when the clock is not watching, so they stay installed:
the compiled mode reads them to judge what pays, the benchmark to split a row's wall time.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

# stage -> the pipeline attributes (dotted) whose forward is that stage
STAGES: dict[str, tuple[str, ...]] = {
    "text": ("text_encoder", "text_encoder_2"),
    "image": ("image_encoder",),
    "denoiser": ("unet", "controlnet"),
    "decode": ("vae.decoder",),
}


def _attribute(pipe, dotted: str):
    obj = pipe
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.nn.Module) else None


class StageClock:
    """Seconds per stage over the calls made inside ``watching()``, and how many forwards each stage ran."""

    def __init__(self, pipe, device: torch.device):
        self.cuda = device.type == "cuda"
        self._active = False
        self._marks: dict[str, list[list]] = defaultdict(list)
        self.calls: dict[str, int] = defaultdict(int)
        self.samples: dict[str, int] = defaultdict(int)  # leading-dimension size summed over forwards
        self._handles = []
        for stage, names in STAGES.items():
            for name in names:
                module = _attribute(pipe, name)
                if module is not None:
                    self._handles.append(module.register_forward_pre_hook(self._before(stage)))
                    self._handles.append(module.register_forward_hook(self._after(stage)))

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _before(self, stage: str):
        def hook(module, args):
            if self._active:
                self._marks[stage].append([self._now(), None])
                self.calls[stage] += 1
                if args and isinstance(args[0], torch.Tensor):
                    self.samples[stage] += args[0].shape[0]
        return hook

    def _after(self, stage: str):
        def hook(module, args, output):
            if self._active and self._marks[stage] and self._marks[stage][-1][1] is None:
                self._marks[stage][-1][1] = self._now()
        return hook

    @contextlib.contextmanager
    def watching(self) -> Iterator[StageClock]:
        """Clear, then record the stages of the calls made inside."""
        self._marks.clear()
        self.calls.clear()
        self.samples.clear()
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    def seconds(self) -> dict[str, float]:
        """Seconds per stage of what was watched (waits for the device on a GPU)."""
        if self.cuda:
            torch.cuda.synchronize()
        totals = {}
        for stage, marks in self._marks.items():
            done = [(start, end) for start, end in marks if end is not None]
            if self.cuda:
                totals[stage] = sum(start.elapsed_time(end) for start, end in done) / 1000
            else:
                totals[stage] = sum(end - start for start, end in done)
        return totals

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
