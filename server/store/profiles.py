"""Profiles: a durable table with a revision counter, and the in-memory mirror every replica serves from.

The engine resolves a profile per batch, so reads hit :class:`ProfileStore`'s mirror, never the database.
Every write bumps ``profile_revision`` in its own transaction, so a revision names one committed state of
the whole table. The mirror is *monotonic*: it applies a snapshot only if it is at least as new as every
change it already holds, and a change only if it is newer than what it holds for that name, so a refresh
racing a local write can never bring back a deleted profile or hide a new one.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, replace
from typing import Protocol

from laser_ops.interventions import InterventionSpec, parse_profile
from server.store.database import Connection, Database

RESERVED_PROFILES = frozenset({"base"})


@dataclass(frozen=True)
class StoredProfile:
    name: str
    description: str
    interventions: list[InterventionSpec]
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class ProfileSnapshot:
    """Every profile as of one revision."""

    revision: int
    profiles: list[StoredProfile]


class ProfileExistsError(KeyError):
    pass


class ProfileBackend(Protocol):
    """Where profiles are stored. Each write returns the revision it committed as."""

    def snapshot(self) -> ProfileSnapshot:
        """All profiles and the revision they are at, read consistently."""
        ...

    def upsert(self, profile: StoredProfile, *, create_only: bool) -> tuple[StoredProfile, int]:
        """Store ``profile`` (keeping the original created_at on replace); ProfileExistsError if create_only."""
        ...

    def delete(self, name: str) -> tuple[bool, int]:
        """(whether it existed, the revision after the call)."""
        ...

    def revision(self) -> int:
        """The revision of the last committed write."""
        ...


class SqlProfileBackend:
    """Profiles in the ``profiles`` table (SQLite or PostgreSQL); ``profile_revision`` counts writes."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    def _bump(con: Connection) -> int:
        # The UPDATE takes the row lock: writers commit in revision order.
        con.execute("UPDATE profile_revision SET value = value + 1 WHERE id = 0")
        return int(con.execute("SELECT value FROM profile_revision WHERE id = 0").fetchone()["value"])

    def snapshot(self) -> ProfileSnapshot:
        with self.db.snapshot() as con:
            revision = int(con.execute("SELECT value FROM profile_revision WHERE id = 0").fetchone()["value"])
            rows = con.execute("SELECT * FROM profiles ORDER BY name").fetchall()
        return ProfileSnapshot(revision, [
            StoredProfile(r["name"], r["description"], parse_profile(json.loads(r["interventions"])),
                          r["created_at"], r["updated_at"]) for r in rows])

    def upsert(self, profile: StoredProfile, *, create_only: bool) -> tuple[StoredProfile, int]:
        payload = json.dumps([s.model_dump(exclude_none=True) for s in profile.interventions])
        with self.db.transaction() as con:
            row = con.execute("SELECT created_at FROM profiles WHERE name = ?", (profile.name,)).fetchone()
            if row is not None and create_only:
                raise ProfileExistsError(profile.name)
            created = row["created_at"] if row is not None else profile.created_at
            con.execute(
                "INSERT INTO profiles (name, description, interventions, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET description = excluded.description, "
                "interventions = excluded.interventions, updated_at = excluded.updated_at",
                (profile.name, profile.description, payload, created, profile.updated_at))
            revision = self._bump(con)
        return replace(profile, created_at=created), revision

    def delete(self, name: str) -> tuple[bool, int]:
        with self.db.transaction() as con:
            deleted = con.execute("DELETE FROM profiles WHERE name = ?", (name,)).rowcount > 0
            if deleted:
                return True, self._bump(con)
            return False, int(con.execute("SELECT value FROM profile_revision WHERE id = 0").fetchone()["value"])

    def revision(self) -> int:
        with self.db.snapshot() as con:
            return int(con.execute("SELECT value FROM profile_revision WHERE id = 0").fetchone()["value"])


class ProfileStore:
    """Named edit profiles. ``base`` is reserved (the unedited model) and never stored.

    Writes go to the backend first and reach the mirror only once committed; :meth:`refresh` picks up what
    other replicas wrote (the server calls it every ``profile_refresh_s``). Bookkeeping that keeps the
    mirror monotonic (all under one lock):

    - ``_base``: the revision of the last snapshot applied (the mirror holds every change up to it);
    - ``_changed``: name -> revision of a local change applied since (a delete is a change too);
    - ``_complete``: the highest revision r such that every change up to r is in the mirror. A refresh is
      needed only when the backend's revision differs from it.
    """

    def __init__(self, backend: ProfileBackend) -> None:
        self.backend = backend
        self._lock = threading.Lock()
        self._cache: dict[str, StoredProfile] = {}
        self._base = -1
        self._changed: dict[str, int] = {}
        self._complete = -1
        self._applied: set[int] = set()  # revisions above _complete applied out of order
        self.reload()

    @property
    def revision(self) -> int:
        """Every profile change up to this revision is in the mirror."""
        with self._lock:
            return self._complete

    def _floor(self) -> int:
        return max([self._base, *self._changed.values()])

    def _apply_snapshot(self, snap: ProfileSnapshot) -> bool:
        with self._lock:
            if snap.revision < self._floor():
                return False  # older than a change the mirror already holds: applying it would go back
            self._cache = {p.name: p for p in snap.profiles}
            self._base = self._complete = snap.revision
            self._changed.clear()
            self._applied = {r for r in self._applied if r > snap.revision}
            self._advance()
            return True

    def _apply_change(self, name: str, profile: StoredProfile | None, revision: int) -> None:
        with self._lock:
            if revision > self._changed.get(name, self._base):
                if profile is None:
                    self._cache.pop(name, None)
                else:
                    self._cache[name] = profile
                self._changed[name] = revision
            if revision > self._complete:
                self._applied.add(revision)
                self._advance()

    def _advance(self) -> None:
        while self._complete + 1 in self._applied:
            self._complete += 1
            self._applied.discard(self._complete)

    def reload(self) -> bool:
        """Load a snapshot of the backend; False if a newer local change made it stale (not applied)."""
        return self._apply_snapshot(self.backend.snapshot())

    def refresh(self) -> bool:
        """Reload if another writer changed the profiles; True when the mirror changed."""
        if self.backend.revision() == self.revision:
            return False
        return self.reload()

    def list(self) -> list[StoredProfile]:
        with self._lock:
            return sorted(self._cache.values(), key=lambda p: p.name)

    def get(self, name: str) -> StoredProfile | None:
        with self._lock:
            return self._cache.get(name)

    def specs(self, name: str) -> list[InterventionSpec]:
        """Interventions of a profile (``base`` -> []); KeyError if unknown."""
        if name == "base":
            return []
        p = self.get(name)
        if p is None:
            raise KeyError(name)
        return p.interventions

    def __contains__(self, name: object) -> bool:
        return name == "base" or (isinstance(name, str) and self.get(name) is not None)

    def put(self, name: str, interventions: list[InterventionSpec], description: str = "", *,
            create_only: bool = False) -> StoredProfile:
        """Store a profile (blocking: call off the event loop); servable from the mirror once this returns."""
        if name in RESERVED_PROFILES:
            raise ProfileExistsError(name)
        now = time.time()
        stored, revision = self.backend.upsert(StoredProfile(name, description, list(interventions), now, now),
                                               create_only=create_only)
        self._apply_change(name, stored, revision)
        return stored

    def delete(self, name: str) -> bool:
        """Delete a profile (blocking: call off the event loop); gone from the mirror once this returns."""
        deleted, revision = self.backend.delete(name)
        if deleted:
            self._apply_change(name, None, revision)
        elif self.get(name) is not None:  # deleted elsewhere, and this mirror had not seen it yet
            self.reload()
        return deleted
