"""Mixed-profile batches: one forward pass serves rows that belong to different profiles.

The live weights hold one profile (the batch's "anchor"). For every other profile in the batch,
:meth:`WeightSwapper.overrides_for` gives the full parameters that differ from the live state; a
forward hook on each such module recomputes the output of that profile's rows with its own weight
(``F.linear`` on the row subset) and writes it over the anchor's output for those rows. A LASER
profile touches a handful of matrices, so the extra work is a few small matmuls per step, and every
row is still computed only with its own profile's weights. Applies to ``nn.Linear`` and GPT-2
``Conv1D`` modules (all LASER targets).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RowOverrides:
    """Per-row weights for the modules that differ between the profiles of one batch.

    ``overrides`` maps a row tag (e.g. a profile name) to ``{parameter name: full weight tensor}``;
    rows whose tag is absent use the live weights. Call :meth:`set_rows` with the tags of the
    current rows (in batch order) before each forward pass.
    """

    def __init__(self, model: nn.Module, overrides: Mapping[Hashable, Mapping[str, torch.Tensor]]) -> None:
        self.model = model
        by_module: dict[str, dict[Hashable, torch.Tensor]] = {}
        for tag, params in overrides.items():
            for name, weight in params.items():
                module_name, _, leaf = name.rpartition(".")
                if leaf != "weight":
                    raise ValueError(f"only weight overrides are supported, got {name}")
                by_module.setdefault(module_name, {})[tag] = weight
        self._modules = {name: (model.get_submodule(name), weights) for name, weights in by_module.items()}
        for name, (module, _) in self._modules.items():
            if not isinstance(module, nn.Linear) and type(module).__name__ != "Conv1D":
                raise TypeError(f"{name} is a {type(module).__name__}; only Linear and Conv1D rows can be overridden")
        self._rows: dict[Hashable, torch.Tensor] = {}
        self._n_rows = 0
        self._flat: dict[tuple[Hashable, int], torch.Tensor] = {}

    @property
    def empty(self) -> bool:
        return not self._modules

    def set_rows(self, tags: Sequence[Hashable]) -> None:
        """Tags of the rows of the next forward pass, in batch order."""
        device = next(self.model.parameters()).device
        positions: dict[Hashable, list[int]] = {}
        for i, tag in enumerate(tags):
            positions.setdefault(tag, []).append(i)
        self._rows = {tag: torch.tensor(rows, dtype=torch.long, device=device) for tag, rows in positions.items()}
        self._n_rows = len(tags)
        self._flat: dict[tuple[Hashable, int], torch.Tensor] = {}

    def _indices(self, tag: Hashable, leading: int) -> torch.Tensor | None:
        """Indices along dim 0 of a module input: batch rows, or row-major tokens of rows when a model
        flattens (batch, seq) to one dimension before its MLP (OPT does)."""
        rows = self._rows.get(tag)
        if rows is None or leading == self._n_rows:
            return rows
        if self._n_rows == 0 or leading % self._n_rows:
            raise RuntimeError(f"cannot map {leading} leading positions onto {self._n_rows} rows")
        seq = leading // self._n_rows
        key = (tag, seq)
        if key not in self._flat:
            self._flat[key] = (rows[:, None] * seq + torch.arange(seq, device=rows.device)).reshape(-1)
        return self._flat[key]

    def _hook(self, weights: Mapping[Hashable, torch.Tensor], module: nn.Module, args: tuple[Any, ...],
              output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for tag, weight in weights.items():
            rows = self._indices(tag, x.shape[0])
            if rows is None:
                continue
            sub = x.index_select(0, rows)
            if isinstance(module, nn.Linear):
                y = F.linear(sub, weight, module.bias)
            else:  # Conv1D stores (in, out): y = x @ W + b
                y = torch.matmul(sub, weight)
                if module.bias is not None:
                    y = y + module.bias
            output.index_copy_(0, rows, y.to(output.dtype))
        return output

    @contextmanager
    def installed(self) -> Iterator[RowOverrides]:
        """Hooks in place for the block; removed in ``finally`` whatever happens."""
        handles = []
        try:
            for module, weights in self._modules.values():
                handles.append(module.register_forward_hook(
                    lambda mod, args, out, _w=weights: self._hook(_w, mod, args, out)))
            yield self
        finally:
            for handle in handles:
                handle.remove()
