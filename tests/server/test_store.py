"""The store contract, run against both backends (embedded SQLite and PostgreSQL): schema versions and
migrations, profiles with their revision and the monotonic mirror, datasets, and jobs with leases.

Lease expiry is simulated by moving a heartbeat back in the database (never by sleeping); races are forced
with barriers and events.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from laser_ops.datasets import parse_jsonl
from laser_ops.interventions import parse_profile
from laser_ops.sweeps import SweepRow
from server.store import (
    Database,
    ProfileExistsError,
    ProfileSnapshot,
    ProfileStore,
    SchemaError,
    SqliteDatabase,
    SqlProfileBackend,
    StoredProfile,
    StoreUnavailableError,
    open_database,
)
from server.store.datasets import DatasetExistsError, DatasetStore
from server.store.jobs import JobStore
from server.store.migrations import MIGRATIONS

LATEST = MIGRATIONS[-1].version
P1 = parse_profile([{"target": "fc_in", "layer": 1, "rank_fraction": 0.1}])
P2 = parse_profile([{"target": "fc_out", "layer": 2, "rank_fraction": 0.5}])
TABLES = ("profiles", "profile_revision", "datasets", "jobs", "job_rows", "schema_migrations")


@pytest.fixture
def db(database_url: str | None, tmp_path: Path):
    database = open_database(database_url, tmp_path / "laser.sqlite3")
    yield database
    database.close()


# ---------------------------------------------------------------------------------------------- schema


def test_migrations_reach_the_latest_version_once(db: Database) -> None:
    assert db.schema_version() == LATEST
    assert db.migrate() == LATEST  # again: nothing to do
    with db.snapshot() as con:
        versions = [r["version"] for r in con.execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == list(range(1, LATEST + 1))


def test_a_newer_schema_is_refused(db: Database) -> None:
    with db.transaction() as con:
        con.execute("INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                    (LATEST + 7, "from the future", time.time()))
    with pytest.raises(SchemaError, match=f"schema version {LATEST + 7}, newer than this laser-serve"):
        db.migrate()


def test_schema_is_identical_on_both_backends(tmp_path: Path, postgres_url: str) -> None:
    lite = open_database(None, tmp_path / "laser.sqlite3")
    pg = open_database(postgres_url, tmp_path)
    try:
        for table in TABLES:
            assert lite.columns(table) == pg.columns(table), table
            assert lite.columns(table), table
    finally:
        lite.close()
        pg.close()


V01_DDL = """
CREATE TABLE profiles (name TEXT PRIMARY KEY, description TEXT NOT NULL DEFAULT '', interventions TEXT NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE profile_revision (id INTEGER PRIMARY KEY CHECK (id = 0), value INTEGER NOT NULL);
INSERT INTO profile_revision (id, value) VALUES (0, 3);
CREATE TABLE datasets (name TEXT PRIMARY KEY, kind TEXT NOT NULL, size INTEGER NOT NULL, source TEXT,
    description TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, data TEXT NOT NULL);
CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL DEFAULT 'sweep', state TEXT NOT NULL, dataset TEXT NOT NULL,
    config TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL, finished_at REAL, error TEXT,
    done INTEGER NOT NULL DEFAULT 0, total INTEGER, elapsed_s REAL NOT NULL DEFAULT 0, stopped TEXT,
    n_validation INTEGER, n_test INTEGER, best_key TEXT);
CREATE TABLE job_rows (job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE, key TEXT NOT NULL,
    step INTEGER NOT NULL, row TEXT NOT NULL, PRIMARY KEY (job_id, key));
CREATE INDEX jobs_state ON jobs(state);
"""


def test_a_v01_sqlite_file_is_migrated_in_place(tmp_path: Path) -> None:
    """A data dir written by v0.1 (no schema version): its profiles and interrupted job survive the upgrade."""
    path = tmp_path / "laser.sqlite3"
    con = sqlite3.connect(path)
    con.executescript(V01_DDL)
    con.execute("INSERT INTO profiles VALUES ('old', 'kept', ?, 1.0, 2.0)",
                (json.dumps([s.model_dump(exclude_none=True) for s in P1]),))
    con.execute("INSERT INTO jobs (id, state, dataset, config, created_at, done) VALUES "
                "('sweep-old', 'running', 'toy', '{}', 5.0, 1)")
    con.execute("INSERT INTO job_rows VALUES ('sweep-old', 'base', 0, ?)",
                (SweepRow(key="base", step=0, role="base").model_dump_json(),))
    con.commit()
    con.close()

    db = open_database(None, path)
    try:
        assert db.schema_version() == LATEST
        assert {"owner", "heartbeat", "model_fingerprint", "model_id"} <= set(db.columns("jobs"))
        profiles = ProfileStore(SqlProfileBackend(db))
        assert profiles.revision == 3 and profiles.get("old").description == "kept"
        jobs = JobStore(db)
        claim = jobs.claim_next("new-server", lease_s=30)  # interrupted under v0.1: nobody owns it
        assert claim is not None and claim.job.id == "sweep-old" and claim.previous_owner is None
        assert claim.job.model_fingerprint is None and [r.key for r in jobs.rows("sweep-old")] == ["base"]
        assert jobs.bind_model("sweep-old", "new-server", "f" * 64, "tiny")
        assert jobs.get("sweep-old").model_fingerprint == "f" * 64
    finally:
        db.close()


# ---------------------------------------------------------------------------------------------- profiles


def test_profile_writes_bump_the_revision_in_their_transaction(db: Database) -> None:
    backend = SqlProfileBackend(db)
    start = backend.revision()
    stored, r1 = backend.upsert(StoredProfile("a", "", P1, 1.0, 1.0), create_only=True)
    assert r1 == start + 1 and stored.created_at == 1.0
    with pytest.raises(ProfileExistsError):
        backend.upsert(StoredProfile("a", "", P2, 2.0, 2.0), create_only=True)
    assert backend.revision() == r1  # a refused write commits nothing
    replaced, r2 = backend.upsert(StoredProfile("a", "new", P2, 3.0, 3.0), create_only=False)
    assert r2 == r1 + 1 and replaced.created_at == 1.0  # created_at kept on replace
    snap = backend.snapshot()
    assert snap.revision == r2 and [(p.name, p.description) for p in snap.profiles] == [("a", "new")]
    assert snap.profiles[0].interventions == P2
    assert backend.delete("a") == (True, r2 + 1)
    assert backend.delete("a") == (False, r2 + 1)  # nothing deleted, nothing bumped
    assert backend.snapshot() == ProfileSnapshot(r2 + 1, [])


class PausingBackend(SqlProfileBackend):
    """Pauses one chosen call after the database work and before returning, to force an interleaving."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.pause: str | None = None
        self.reached = threading.Event()
        self.go = threading.Event()

    def _maybe_pause(self, call: str) -> None:  # noqa: D401
        if self.pause == call:
            self.pause = None
            self.reached.set()
            assert self.go.wait(30)

    def snapshot(self) -> ProfileSnapshot:
        snap = super().snapshot()
        self._maybe_pause("snapshot")
        return snap

    def upsert(self, profile: StoredProfile, *, create_only: bool) -> tuple[StoredProfile, int]:
        result = super().upsert(profile, create_only=create_only)
        self._maybe_pause("upsert")
        return result


def _in_thread(fn, *args):
    t = threading.Thread(target=fn, args=args)
    t.start()
    return t


def test_a_stale_refresh_never_hides_a_new_profile_or_revives_a_deleted_one(db: Database,
                                                                           tmp_path: Path) -> None:
    """The race from the issue, forced: refresh reads a snapshot, a local write commits and is mirrored,
    then the stale snapshot arrives. It must be dropped, for a put and for a delete."""
    backend = PausingBackend(db)
    store = ProfileStore(backend)
    other = ProfileStore(SqlProfileBackend(db))  # another replica writing to the same store
    other.put("gone", P1)  # makes the refresh below necessary (this mirror is behind)

    backend.pause = "snapshot"
    applied: list[bool] = []
    refresher = _in_thread(lambda: applied.append(store.refresh()))
    assert backend.reached.wait(30)  # the refresh holds a snapshot without "new" and with "gone"
    store.put("new", P2)
    assert store.delete("gone") is True
    backend.go.set()
    refresher.join(30)
    assert applied == [False]  # the stale snapshot was dropped...
    assert store.get("new") is not None and store.get("gone") is None  # ...so nothing went back in time
    assert store.revision < backend.revision()  # "gone" was created elsewhere: the mirror knows it is behind
    assert store.refresh() is True and [p.name for p in store.list()] == ["new"]
    assert store.revision == backend.revision() and store.refresh() is False


def test_local_writes_committing_out_of_order_keep_the_newest(db: Database) -> None:
    backend = PausingBackend(db)
    store = ProfileStore(backend)
    backend.pause = "upsert"
    slow = _in_thread(lambda: store.put("p", P1, "first"))
    assert backend.reached.wait(30)  # "first" committed but not yet mirrored
    store.put("p", P2, "second")  # commits after it, mirrored at once
    backend.go.set()
    slow.join(30)
    assert store.get("p").description == "second"
    assert store.revision == backend.revision()  # complete: both changes accounted for
    assert store.refresh() is False


def test_refresh_picks_up_another_replicas_writes(db: Database) -> None:
    a = ProfileStore(SqlProfileBackend(db))
    b = ProfileStore(SqlProfileBackend(db))
    a.put("x", P1, "v1")
    assert b.get("x") is None and b.refresh() is True and b.get("x").description == "v1"
    a.put("x", P1, "v2")
    b.put("y", P2)  # b's own write lands after a's: b must still refresh to see v2
    assert b.get("x").description == "v1" and b.refresh() is True and b.get("x").description == "v2"
    assert a.delete("x") and b.refresh() and b.get("x") is None
    assert b.refresh() is False


# ---------------------------------------------------------------------------------------------- datasets


def _toy(name: str, answer: str) -> object:
    return parse_jsonl(f'{{"input": "2+2=", "choices": ["4", "{answer}"], "answer": 0}}\n', name)


def test_datasets_round_trip_and_a_reupload_is_never_served_stale(db: Database) -> None:
    a, b = DatasetStore(db), DatasetStore(db)
    stored = a.put(_toy("toy", "5"), "first")
    assert stored.size == 1 and [d.name for d in a.list()] == ["toy"] and "toy" in b
    assert b.get("toy").examples[0].choices == ["4", "5"]  # b parsed and cached it
    with pytest.raises(DatasetExistsError):
        a.put(_toy("toy", "6"))
    assert a.delete("toy") and not a.delete("toy")
    a.put(_toy("toy", "7"), "second")  # same name, new content, written by another replica
    assert b.get("toy").examples[0].choices == ["4", "7"]
    with pytest.raises(KeyError):
        b.get("missing")
    assert b.info("epistemic_reasoning").builtin and not a.is_builtin("toy")


# ---------------------------------------------------------------------------------------------- jobs


def _job(jobs: JobStore, fingerprint: str = "fp") -> str:
    return jobs.create("toy", {"types": ["fc_in"]}, total=3, n_validation=2, n_test=2, model_fingerprint=fingerprint,
                       model_id="tiny").id


def _age_heartbeat(db: Database, job_id: str, seconds: float) -> None:
    """Make the owner's last heartbeat ``seconds`` older: what a dead owner looks like after that long."""
    with db.transaction() as con:
        con.execute("UPDATE jobs SET heartbeat = heartbeat - ? WHERE id = ?", (seconds, job_id))


def _row(key: str, step: int = 0) -> SweepRow:
    return SweepRow(key=key, step=step, role="base" if key == "base" else "config")


def test_claims_go_oldest_first_and_once(db: Database) -> None:
    jobs = JobStore(db)
    first, second = _job(jobs), _job(jobs)
    claim = jobs.claim_next("A", lease_s=30)
    assert claim.job.id == first and claim.job.state == "running" and claim.job.owner == "A"
    assert claim.job.started_at is not None and claim.previous_owner is None
    assert jobs.claim(first, "B", lease_s=30) is None  # held: not B's to take
    assert jobs.claim_next("B", lease_s=30).job.id == second
    assert jobs.claim_next("C", lease_s=30) is None
    assert [j.id for j in jobs.list()] == [second, first]  # newest first
    assert jobs.counts() == {"running": 2}


def test_exactly_one_of_many_concurrent_claimers_wins(db: Database, tmp_path: Path) -> None:
    jobs = JobStore(db)
    job_id = _job(jobs)
    n = 6
    barrier = threading.Barrier(n)
    won: list[str] = []

    def claimer(owner: str) -> None:
        barrier.wait(30)
        if jobs.claim(job_id, owner, lease_s=30) is not None:
            won.append(owner)

    threads = [_in_thread(claimer, f"owner-{i}") for i in range(n)]
    for t in threads:
        t.join(60)
    assert len(won) == 1 and jobs.get(job_id).owner == won[0]


def test_takeover_only_after_the_lease_lapses(db: Database) -> None:
    jobs = JobStore(db)
    job_id = _job(jobs)
    assert jobs.claim(job_id, "A", lease_s=30) is not None
    assert jobs.renew(job_id, "A") and not jobs.renew(job_id, "B")
    assert jobs.record_step(job_id, "A", [_row("base")], done=1)
    _age_heartbeat(db, job_id, 20)
    assert jobs.claim_next("B", lease_s=30) is None  # 20 s of silence < 30 s lease: A may just be slow
    _age_heartbeat(db, job_id, 20)
    claim = jobs.claim_next("B", lease_s=30)
    assert claim is not None and claim.job.owner == "B" and claim.previous_owner == "A"
    assert 40 <= claim.idle_s < 60
    # A comes back (a long pause, not dead): every write it tries is refused, and it stops.
    assert not jobs.renew(job_id, "A")
    assert not jobs.record_step(job_id, "A", [_row("laser:fc_in:1:0.5", 1)], done=2)
    assert not jobs.finish(job_id, "A", "succeeded", finished_at=time.time())
    assert [r.key for r in jobs.rows(job_id)] == ["base"]
    assert jobs.record_step(job_id, "B", [_row("laser:fc_in:1:0.5", 1)], done=2)
    assert jobs.finish(job_id, "B", "succeeded", [_row("base"), _row("laser:fc_in:1:0.5", 1)], done=2,
                       finished_at=time.time())
    job = jobs.get(job_id)
    assert job.state == "succeeded" and job.done == 2 and len(jobs.rows(job_id)) == 2  # rows upserted by key


def test_released_job_is_resumed_at_once(db: Database) -> None:
    jobs = JobStore(db)
    job_id = _job(jobs)
    jobs.claim(job_id, "A", lease_s=30)
    assert jobs.release(job_id, "A", elapsed_s=1.5) and not jobs.release(job_id, "A")
    claim = jobs.claim_next("B", lease_s=30)
    assert claim.job.id == job_id and claim.previous_owner is None and claim.job.elapsed_s == 1.5


def test_cancel_is_a_state_change_the_owner_sees(db: Database) -> None:
    jobs = JobStore(db)
    queued, running = _job(jobs), _job(jobs)
    assert jobs.cancel(queued)
    assert jobs.claim_next("A", lease_s=30).job.id == running  # a cancelled job is never claimed
    assert jobs.cancel(running) and not jobs.cancel(running)
    assert not jobs.renew(running, "A")
    assert not jobs.record_step(running, "A", [_row("base")], done=1)
    assert not jobs.finish(running, "A", "succeeded")
    assert jobs.settle_cancelled(running, "A", [], stopped="cancelled", elapsed_s=2.0)
    assert not jobs.settle_cancelled(running, "B", [], stopped="cancelled")  # only its owner settles it
    job = jobs.get(running)
    assert job.state == "cancelled" and job.stopped == "cancelled" and job.finished_at is not None
    assert jobs.counts() == {"cancelled": 2} and jobs.active_using("toy") == []
    assert jobs.claim_next("B", lease_s=0.5) is None


def test_bad_fields_and_states_are_refused(db: Database) -> None:
    jobs = JobStore(db)
    job_id = _job(jobs)
    jobs.claim(job_id, "A", lease_s=30)
    with pytest.raises(ValueError, match="unknown job fields"):
        jobs.record_step(job_id, "A", [], state="succeeded")
    with pytest.raises(ValueError, match="not a terminal state"):
        jobs.finish(job_id, "A", "queued")
    assert jobs.get(job_id).owner == "A" and jobs.get("nope") is None


# ---------------------------------------------------------------------------------------------- off the loop


def test_a_locked_database_is_unavailable_not_an_error(tmp_path: Path) -> None:
    """Store calls from async code run on the store's threads; a database locked past its timeout is a
    StoreUnavailableError (503 Retry-After at the routes), and the event loop keeps running meanwhile."""
    db = SqliteDatabase(tmp_path / "laser.sqlite3", busy_timeout_s=0.2)
    db.migrate()
    holder = sqlite3.connect(db.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    jobs = JobStore(db)

    async def main() -> tuple[int, type[BaseException] | None]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        try:
            await db.run(_job, jobs)
        except BaseException as e:  # noqa: BLE001 - the type is the assertion
            error: type[BaseException] | None = type(e)
        else:
            error = None
        task.cancel()
        return ticks, error

    try:
        ticks, error = asyncio.run(main())
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert error is StoreUnavailableError
    assert ticks > 1  # the loop ran while the store call waited on the lock
    assert jobs.get(_job(jobs)) is not None  # unlocked: works again
    db.close()
