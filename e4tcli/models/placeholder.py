"""The placeholder word S*: an added token whose embedding row is the encoder's output.

The text encoder's embedding table is not resized or modified. The wrapper
looks the placeholder up as the class word, then, when a concept embedding is
set, swaps it in at the placeholder positions, per batch element and
differentiably, so gradients reach the encoder through the text encoder.
"""

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn


class PlaceholderEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, placeholder_id: int, class_id: int):
        super().__init__()
        self.base = base
        self.placeholder_id = placeholder_id
        self.class_id = class_id
        self.concept: Optional[torch.Tensor] = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_placeholder = input_ids == self.placeholder_id
        embeddings = self.base(torch.where(is_placeholder, self.class_id, input_ids))
        if self.concept is None:
            return embeddings
        concept = self.concept.to(embeddings.dtype)[:, None, :].expand_as(embeddings)
        return torch.where(is_placeholder[..., None], concept, embeddings)

    @contextmanager
    def using(self, concept: Optional[torch.Tensor]) -> Iterator[None]:
        previous, self.concept = self.concept, concept
        try:
            yield
        finally:
            self.concept = previous
