"""IP-Adapter image-prompt embeddings: computed once per distinct content, assembled per row for a batch.

diffusers' public API cannot give each prompt of one call its own IP-Adapter image (upstream issue #9813): a
list of images for one adapter is seen by every prompt, and per-row ``ip_adapter_image_embeds`` are repeated
once per row. What is exact instead: per adapter, a tensor ordered ``[negatives of the rows; positives of the
rows]`` of shape ``(2B, n_images, ...)``, the order of the prompt embeddings, handed to the unet unchanged
(``tasks.render.per_row_ip_embeds``), so row i sees only its own image(s). With guidance off, only the
positives are passed.

The encoding is the pipeline's own ``encode_image`` (what ``prepare_ip_adapter_image_embeds`` calls), so the
result is bit-identical to passing ``ip_adapter_image``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import PIL.Image
import torch


class EmbeddingCache:
    """Per-pipeline cache of ``[negative; positive]`` embeddings keyed by (encoder output kind, content hash)."""

    def __init__(self, capacity: int = 512):
        self.capacity = capacity
        self._items: OrderedDict[tuple[bool, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.encoded = 0  # how many times the image encoder ran (tests count it)

    def get(self, pipe, hidden_states: bool, content_key: str, images: Sequence[PIL.Image.Image], device) -> torch.Tensor:
        key = (hidden_states, content_key)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        # each distinct image once (a cell may list one image several times): the image processor holds
        # full-size copies of every image it is given
        position: dict[int, int] = {}
        distinct: list[PIL.Image.Image] = []
        for image in images:
            if id(image) not in position:
                position[id(image)] = len(distinct)
                distinct.append(image)
        with torch.inference_mode():
            positive, negative = pipe.encode_image(distinct, device, 1, hidden_states)
        if len(distinct) < len(images):
            order = torch.tensor([position[id(image)] for image in images])
            positive, negative = positive[order], negative[order]
        embeds = torch.stack([negative, positive])  # (2, n_images, ...): what prepare_ip_adapter_image_embeds builds
        with self._lock:
            self.encoded += 1
            self._items[key] = embeds
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return embeds

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.encoded = 0


def batch_embeds(per_row: Sequence[Sequence[torch.Tensor]], cfg: bool) -> list[torch.Tensor]:
    """Per adapter, the rows' embeddings stacked for one call: ``[negatives; positives]`` or positives only."""
    stacked = []
    for adapter in range(len(per_row[0])):
        negatives = torch.cat([row[adapter][0:1] for row in per_row])
        positives = torch.cat([row[adapter][1:2] for row in per_row])
        stacked.append(torch.cat([negatives, positives]) if cfg else positives)
    return stacked
