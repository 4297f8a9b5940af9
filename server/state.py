"""Long-lived objects, built once at start-up (vLLM's init_app_state): the typed application state."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from laser_ops.loading import LoadedModel, load_model
from laser_ops.scoring import HFScorer
from laser_ops.svd import SvdCache
from laser_ops.swap import WeightSwapper
from laser_ops.targets import ArchSpec, FusedSlice, ModelTargets, TypeSlot, register_architecture

from server.config import Settings
from server.decompositions import Decomposer
from server.engine import Engine
from server.metrics import Metrics
from server.model_info import ModelIdentity
from server.store import Database, ProfileStore, SqlProfileBackend, open_database
from server.store.datasets import DatasetStore

if TYPE_CHECKING:
    from server.serving.jobs.manager import JobManager
    from server.serving.openai.common import TokenText

logger = logging.getLogger(__name__)


@dataclass
class Services:
    """Everything a request may use. The model is not here: the engine holds it (``engine.info`` says what
    the rest of the server may know about it), and every computation on it is submitted to the engine."""

    settings: Settings
    engine: Engine
    decomposer: Decomposer
    db: Database
    profiles: ProfileStore
    datasets: DatasetStore
    metrics: Metrics
    #: The sweep-job manager, started by the jobs start-up hook (None before it and in tools without jobs).
    jobs: JobManager | None = None
    #: Serialises export writes (one folder at a time; checks and writes must not interleave).
    export_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Token strings of the OpenAI log-prob views, built on first use.
    token_text: TokenText | None = None

    def close(self) -> None:
        self.decomposer.close()
        self.engine.stop()
        self.db.close()


def register_arch_spec_file(path: str) -> None:
    """Register an architecture from JSON: {name, model_types, layers, types: {type: module | {module, fused_part, interleaved}}}."""
    raw = json.loads(open(path).read())
    types = {}
    for t, slot in raw["types"].items():
        if isinstance(slot, str):
            types[t] = TypeSlot(slot)
        else:
            fused = FusedSlice(slot["fused_part"], slot.get("interleaved", False)) if "fused_part" in slot else None
            types[t] = TypeSlot(slot["module"], fused)
    register_architecture(ArchSpec(raw["name"], tuple(raw["model_types"]), tuple(raw["layers"]), types),
                          replace=True)


def build_services(settings: Settings, metrics: Metrics, loaded: LoadedModel | None = None) -> Services:
    """Open and migrate the database (first: an unreachable one fails fast), load the model (unless given),
    restore profiles, start the engine."""
    if settings.arch_spec is not None:
        register_arch_spec_file(str(settings.arch_spec))
    url = settings.database_url.get_secret_value() if settings.database_url is not None else None
    db = open_database(url, settings.db_path, pool_size=settings.database_pool_size)
    try:
        if loaded is None:
            loaded = load_model(settings.model, device=settings.device, dtype=settings.dtype,
                                cache_dir=settings.cache_dir)
        targets = ModelTargets.of(loaded.model)
        svd_dir = settings.data_dir / "svd" if settings.svd_disk_cache_bytes > 0 else None
        svd_cache = SvdCache(loaded.fingerprint, max_bytes=settings.svd_cache_bytes, disk_dir=svd_dir,
                             max_disk_bytes=settings.svd_disk_cache_bytes, device=loaded.device)
        # Factors and edited tensors live beside the model (on a GPU a cached switch is a device-to-device
        # copy); the originals stay on CPU (WeightSwapper), so revert never depends on device memory.
        swapper = WeightSwapper(loaded.model, svd_cache=svd_cache, max_cache_bytes=settings.edit_cache_bytes,
                                targets=targets, cache_device=loaded.device)
        scorer = HFScorer(loaded.model, loaded.tokenizer, batch_size=settings.max_running,
                          max_batch_tokens=settings.max_batch_tokens)
        profiles = ProfileStore(SqlProfileBackend(db))
    except BaseException:
        db.close()
        raise
    engine = Engine(swapper, scorer, profiles.specs, metrics, max_queue=settings.max_queue,
                    max_running=settings.max_running, max_batch_tokens=settings.max_batch_tokens,
                    prefill_chunk=settings.prefill_chunk, profile_cache_bytes=settings.profile_cache_bytes,
                    identity=ModelIdentity.of(loaded))
    engine.start()
    metrics.set_active("base", None)
    logger.info("ready: %s (fingerprint %s) with %d stored profiles in %s", loaded.model_id,
                loaded.fingerprint[:16], len(profiles.list()), db.describe())
    decomposer = Decomposer(engine, svd_cache)
    return Services(settings, engine, decomposer, db, profiles, DatasetStore(db), metrics)
