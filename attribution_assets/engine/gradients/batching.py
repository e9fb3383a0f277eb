"""Length-sorted packing of documents into padded batches under a token budget.

A document is ``(input_ids, loss_mask)``: ``loss_mask[t] == 1`` marks token ``t``
as a target predicted from tokens ``< t`` (``loss_mask[0]`` must be 0). Batches
are right-padded; ``attention_mask`` is 0 on padding and ``loss_mask`` is 0
there, so with a causal model padding never changes a document's gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Document = tuple[Sequence[int], Sequence[int]]


def validate_documents(docs: Sequence[Document]) -> list[int]:
    """Check each document and return its number of target tokens."""
    counts = []
    for i, (ids, mask) in enumerate(docs):
        if len(ids) != len(mask):
            raise ValueError(
                f"document {i}: {len(ids)} input_ids but {len(mask)} loss_mask entries"
            )
        if len(ids) == 0:
            raise ValueError(f"document {i} is empty")
        if any(m not in (0, 1) for m in mask):
            raise ValueError(f"document {i}: loss_mask entries must be 0 or 1")
        if mask[0]:
            raise ValueError(f"document {i}: loss_mask[0] must be 0 (token 0 has no context)")
        counts.append(int(sum(mask)))
    return counts


def row_positions(mask: Sequence[int], per_token: str) -> list[int]:
    """Token positions that get a row of their own under ``per_token``: ``loss``: the targets
    ``t`` (``mask[t] == 1``); ``positional``: every position before the last target (a later
    position reaches no loss, so its share is zero); ``none``: no position."""
    if per_token == "loss":
        return [t for t, m in enumerate(mask) if m]
    if per_token == "positional":
        last = max((t for t, m in enumerate(mask) if m), default=0)
        return list(range(last))
    if per_token == "none":
        return []
    raise ValueError(f"per_token must be 'none', 'positional' or 'loss', got {per_token!r}")


def pack_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group document indices, longest first, so ``len(batch) * max_len <= max_tokens``.

    A document longer than ``max_tokens`` gets a batch of its own.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens_per_batch must be positive, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # sorted descending: the first document of a batch is its longest
        if current and (len(current) + 1) * lengths[current[0]] > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@dataclass
class Batch:
    """Right-padded tensors ``[B, T]`` and the original indices of its documents."""

    indices: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor


def collate(
    docs: Sequence[Document],
    indices: Sequence[int],
    pad_id: int = 0,
    device: torch.device | str = "cpu",
) -> Batch:
    """Pad ``docs[indices]`` on the right to the longest of them."""
    width = max(len(docs[i][0]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(indices), width), dtype=torch.long)
    loss = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        tokens, mask = docs[i]
        n = len(tokens)
        ids[row, :n] = torch.as_tensor(list(tokens), dtype=torch.long)
        attn[row, :n] = 1
        loss[row, :n] = torch.as_tensor(list(mask), dtype=torch.long)
    return Batch(list(indices), _to_device(ids, device), _to_device(attn, device),
                 _to_device(loss, device))


def _to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device``; CUDA copies go through pinned memory, asynchronously."""
    device = torch.device(device)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def make_batches(
    docs: Sequence[Document], max_tokens: int, pad_id: int = 0, device: torch.device | str = "cpu"
):
    """Yield :class:`Batch` objects covering every document exactly once."""
    for indices in pack_batches([len(d[0]) for d in docs], max_tokens):
        yield collate(docs, indices, pad_id, device)
