"""What the server outside the engine may know about the model: who it is, how it reads text, where its LASER
targets are. No weights.

The engine is the one holder of the model (its owner thread runs every forward pass and every weight edit);
serving modules read this view from ``services.engine.info`` and submit work to the engine for everything
else, so no route can reach a parameter. Tokenizing is safe from any thread: the tokenizer is only read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from laser_ops.interventions import MatrixEdit, expand, parse_profile
from laser_ops.loading import LoadedModel
from laser_ops.scoring import HFScorer
from laser_ops.swap import ProfileLike
from laser_ops.targets import ModelDescription, ModelTargets


@dataclass(frozen=True)
class ModelIdentity:
    """Which weights the engine holds (the fingerprint keys caches and binds sweep jobs)."""

    model_id: str
    source: str
    fingerprint: str
    dtype: str
    device: str

    @classmethod
    def of(cls, loaded: LoadedModel) -> ModelIdentity:
        return cls(model_id=loaded.model_id, source=loaded.source, fingerprint=loaded.fingerprint,
                   dtype=str(loaded.dtype).removeprefix("torch."), device=str(loaded.device))


class ModelInfo:
    """The model's identity, its text interface (the scorer's tokenization, so a prompt is counted exactly as
    it will be run) and its LASER targets."""

    def __init__(self, identity: ModelIdentity | None, scorer: HFScorer, targets: ModelTargets) -> None:
        self._identity = identity
        self._text = scorer  # only its tokenizing half is used here
        self.tokenizer: PreTrainedTokenizerBase = scorer.tokenizer
        self.targets = targets
        self.description: ModelDescription = targets.describe()
        emb = scorer.model.get_input_embeddings()
        #: Rows of the embedding (token ids of a request must be below it).
        self.vocab_size = int(getattr(emb, "num_embeddings", 0) or len(scorer.tokenizer))

    @property
    def identity(self) -> ModelIdentity:
        if self._identity is None:
            raise RuntimeError("the engine was built without the model's identity")
        return self._identity

    @property
    def model_id(self) -> str:
        return self.identity.model_id

    @property
    def max_positions(self) -> int | None:
        """Positions the model takes (None: unbounded); prompt + new tokens must fit."""
        return self._text.max_positions

    @property
    def eos_token_ids(self) -> set[int]:
        """Tokens that end a generation (the ones the engine's decode loop stops on)."""
        return self._text.eos_token_ids

    @property
    def prefix_ids(self) -> list[int]:
        """Prepended by :meth:`encode` when the tokenizer adds a BOS by default."""
        return self._text.prefix_ids

    @property
    def prefix_token_id(self) -> int | None:
        """Conditions the first token when a prompt is empty (BOS, else EOS)."""
        return self._text.prefix_token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the engine runs it (default BOS, no other special tokens)."""
        return self._text.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._text.decode(ids)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) split the way scoring splits them (lm-eval's convention)."""
        return self._text.encode_pair(context, continuation)

    def plan(self, specs: ProfileLike) -> list[MatrixEdit]:
        """Validate a profile against this model and expand it to per-matrix edits (no weights read)."""
        return expand(parse_profile(specs), self.targets)
