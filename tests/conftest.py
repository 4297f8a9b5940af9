"""Fixtures every test package shares: a throwaway PostgreSQL server, and the store backends to run against."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pg_cluster import LocalPostgres, PostgresUnavailable


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[LocalPostgres]:
    """One PostgreSQL cluster for the session; the tests that need it skip, saying why, if it cannot run."""
    try:
        cluster = LocalPostgres.start()
    except PostgresUnavailable as e:
        pytest.skip(f"PostgreSQL unavailable: {e}")
    yield cluster
    cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster: LocalPostgres) -> str:
    """A fresh, empty PostgreSQL database."""
    return postgres_cluster.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """The store a test runs against: None (SQLite under the data dir) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_url")
