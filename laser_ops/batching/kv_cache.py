"""A KV cache whose rows are independent sequences: rows join and leave a running batch freely.

Hugging Face's ``DynamicCache`` holds one rectangular (batch, heads, length, dim) tensor per layer, so
a batch is fixed from prefill to the end of decoding (rows can only be dropped). Continuous batching
needs rows that join mid-decode with prompts of any length. :class:`SlotKVCache` keeps, per layer, a
buffer of ``slots`` rows; each slot holds one sequence from position 0 and has its own length, so a
row never carries padding in front of its tokens and its position ids are simply 0..n-1.

A forward pass works on a set of slots (:meth:`SlotKVCache.step`): each row writes its new keys/values
at its own offset, and attention reads ``[0, max length)`` of those slots under a per-row mask
(:func:`attention_mask`) that hides everything past each row's own length. A contiguous range of
slots is read as a view (the scheduler keeps decoding rows in ``[0, R)``, so a decode step copies
nothing); any other set is gathered, which prompt chunks can afford.

The cache talks to the model only through the ``Cache.update`` protocol of ``transformers``, which
every decoder in the contract table calls, and the 4D mask is passed as ``attention_mask`` (models
use a prepared 4D mask as is), so it works without changing any modeling code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

#: Buffers grow by this factor when a sequence outgrows them (amortised O(1) per token).
_GROWTH = 2
_MIN_LENGTH = 64


@dataclass(frozen=True)
class _Step:
    slots: tuple[int, ...]
    start: int | None  # first slot when ``slots`` is a contiguous range, else None
    slot_index: torch.Tensor  # (rows,)
    offsets: torch.Tensor  # (rows,) write position of each row's first new token
    offsets_list: tuple[int, ...]
    q_len: int
    kv_len: int  # columns attention reads: max(offset + q_len)


class _SlotLayer(CacheLayerMixin):
    """One layer's (slots, heads, capacity, dim) key and value buffers."""

    is_sliding = False
    is_compileable = False

    def __init__(self, owner: SlotKVCache) -> None:
        super().__init__()
        self._owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        slots, capacity = self._owner.slot_capacity, self._owner.length_capacity
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros((slots, key_states.shape[1], capacity, key_states.shape[3]))
        self.values = value_states.new_zeros((slots, value_states.shape[1], capacity, value_states.shape[3]))
        self.is_initialized = True

    def grow(self, slots: int, length: int) -> None:
        if not self.is_initialized:
            return
        old_s, heads, old_l, dim = self.keys.shape
        if slots <= old_s and length <= old_l:
            return
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((max(slots, old_s), old.shape[1], max(length, old_l), old.shape[3]))
            new[:old_s, :, :old_l] = old
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        step = self._owner.current
        if step is None:
            raise RuntimeError("SlotKVCache used outside SlotKVCache.step(): which rows to write is unknown")
        q = key_states.shape[2]
        if step.start is not None:
            stop = step.start + len(step.slots)
            keys, values = self.keys[step.start:stop], self.values[step.start:stop]
            if q == 1:
                rows = torch.arange(len(step.slots), device=keys.device)
                keys[rows, :, step.offsets] = key_states[:, :, 0]
                values[rows, :, step.offsets] = value_states[:, :, 0]
            else:
                self._write_rows(keys, values, range(len(step.slots)), step, key_states, value_states)
            return keys[:, :, :step.kv_len], values[:, :, :step.kv_len]
        self._write_rows(self.keys, self.values, step.slots, step, key_states, value_states)
        return (self.keys.index_select(0, step.slot_index)[:, :, :step.kv_len],
                self.values.index_select(0, step.slot_index)[:, :, :step.kv_len])

    @staticmethod
    def _write_rows(keys: torch.Tensor, values: torch.Tensor, rows: Sequence[int], step: _Step,
                    key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        q = key_states.shape[2]
        for r, (row, off) in enumerate(zip(rows, step.offsets_list)):
            keys[row, :, off:off + q] = key_states[r]
            values[row, :, off:off + q] = value_states[r]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        step = self._owner.current
        return (step.kv_len if step is not None else query_length), 0

    def get_seq_length(self) -> int:
        step = self._owner.current
        return step.kv_len - step.q_len if step is not None else 0

    def get_max_length(self) -> int:
        return -1


class SlotKVCache(Cache):
    """Per-row KV storage for continuous batching; see the module docstring.

    The cache does not track how many tokens each slot holds: the scheduler does (``Sequence.computed``)
    and passes offsets and lengths in.
    """

    def __init__(self, num_layers: int, *, slots: int = 8, length: int = _MIN_LENGTH) -> None:
        self.slot_capacity = max(1, slots)
        self.length_capacity = max(_MIN_LENGTH, length)
        self.current: _Step | None = None
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])

    # -- capacity ---------------------------------------------------------------------------------

    def reserve(self, slots: int, length: int) -> None:
        """Make room for ``slots`` rows of up to ``length`` tokens (grows geometrically)."""
        new_slots, new_len = self.slot_capacity, self.length_capacity
        while new_slots < slots:
            new_slots *= _GROWTH
        while new_len < length:
            new_len *= _GROWTH
        if (new_slots, new_len) == (self.slot_capacity, self.length_capacity):
            return
        for layer in self.layers:
            layer.grow(new_slots, new_len)
        self.slot_capacity, self.length_capacity = new_slots, new_len

    @property
    def nbytes(self) -> int:
        return sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in self.layers if layer.is_initialized)

    # -- forward passes ---------------------------------------------------------------------------

    @contextmanager
    def step(self, slots: Sequence[int], offsets: Sequence[int], q_len: int, device: torch.device) -> Iterator[None]:
        """Scope one forward pass over ``slots`` (row ``r`` of the batch is slot ``slots[r]``).

        Row ``r`` writes its ``q_len`` new tokens at ``offsets[r]``; attention reads the first
        ``max(offsets) + q_len`` columns (masked per row by :func:`attention_mask`).
        """
        slots = tuple(slots)
        kv_len = max(offsets) + q_len
        self.reserve(max(slots) + 1, kv_len)
        contiguous = slots == tuple(range(slots[0], slots[0] + len(slots)))
        self.current = _Step(slots, slots[0] if contiguous else None,
                             torch.tensor(slots, device=device), torch.tensor(list(offsets), device=device),
                             tuple(offsets), q_len, kv_len)
        try:
            yield
        finally:
            self.current = None

    # -- row management ---------------------------------------------------------------------------

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""
        if src == dst or length == 0:
            return
        self.reserve(max(src, dst) + 1, length)
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys[dst, :, :length] = layer.keys[src, :, :length]
                layer.values[dst, :, :length] = layer.values[src, :, :length]

    def release(self) -> None:
        """Drop the buffers (they are rebuilt, small, on the next forward)."""
        for layer in self.layers:
            layer.keys = layer.values = None
            layer.is_initialized = False
        self.slot_capacity = max(1, min(self.slot_capacity, 8))
        self.length_capacity = _MIN_LENGTH


def attention_mask(offsets: torch.Tensor, q_len: int, kv_len: int, dtype: torch.dtype,
                   sliding_window: int | None = None) -> torch.Tensor:
    """Additive (rows, 1, q_len, kv_len) mask: query j of row r (position offsets[r] + j) sees columns
    0..offsets[r] + j (within ``sliding_window`` of it when given); everything else gets dtype-min.

    Additive rather than boolean because some attention implementations (GPT-J's eager path) add the
    mask to the scores; SDPA takes either.
    """
    device = offsets.device
    pos = offsets[:, None] + torch.arange(q_len, device=device)[None, :]  # (rows, q)
    cols = torch.arange(kv_len, device=device)
    allowed = cols[None, None, :] <= pos[:, :, None]
    if sliding_window is not None:
        allowed &= cols[None, None, :] > pos[:, :, None] - sliding_window
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
