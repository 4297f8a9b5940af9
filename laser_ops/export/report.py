"""What an export wrote: per-matrix storage and cost, and the totals (JSON-serialisable)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ExportMode = Literal["dense", "factored"]


@dataclass
class MatrixRow:
    """One edited logical matrix: how it is stored and what that costs.

    ``dense_bytes`` is the matrix at the model's dtype; ``stored_bytes`` what this export spends
    on it (the two factors when ``stored == "factored"``, else the dense bytes).
    """

    param_name: str
    type: str
    layer: int
    kind: str
    shape: tuple[int, int]
    k: int | None
    stored: Literal["dense", "factored"]
    dense_bytes: int
    stored_bytes: int
    saved_bytes: int
    note: str | None = None


@dataclass
class ExportReport:
    """What an export wrote. JSON-serialisable with :meth:`to_dict` / :meth:`to_json`.

    ``dense_bytes``: the edited matrices at the model's dtype; ``factored_bytes``: what this export
    spends on those same matrices; ``saved_bytes = dense_bytes - factored_bytes`` (0 for dense
    exports). ``bytes`` is the size of every file written; ``files`` maps each relative file name
    to its size.
    """

    path: str
    mode: ExportMode
    files: dict[str, int]
    bytes: int
    dense_bytes: int
    factored_bytes: int
    saved_bytes: int
    rows: list[MatrixRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    profile_signature: str = ""
    fingerprint: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for row in d["rows"]:
            row["shape"] = list(row["shape"])
        return d

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)
