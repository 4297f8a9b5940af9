"""Settings for the shared store: database_url is a PostgreSQL URL (never echoed back), job_lease_s bounded."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.config import Settings


def test_database_url_selects_postgresql_and_is_kept_secret() -> None:
    assert Settings().database_url is None  # default: SQLite under data_dir
    s = Settings(database_url="postgresql://laser:s3cret@db:5432/laser")
    assert s.database_url.get_secret_value().endswith("@db:5432/laser") and "s3cret" not in repr(s)
    assert Settings(database_url="").database_url is None


@pytest.mark.parametrize("url", ["mysql://u:s3cret@db/x", "sqlite:///tmp/x.db", "u:s3cret@db:5432/x"])
def test_other_database_urls_are_refused_without_echoing_them(url: str) -> None:
    with pytest.raises(ValidationError) as exc:
        Settings(database_url=url)
    assert "postgresql://" in str(exc.value) and "s3cret" not in str(exc.value)


@pytest.mark.parametrize("lease", [0, 0.1, 7200])
def test_job_lease_is_bounded(lease: float) -> None:
    with pytest.raises(ValidationError, match="job_lease_s"):
        Settings(job_lease_s=lease)
