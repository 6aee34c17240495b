"""A throwaway PostgreSQL server for the tests (microcot_host.pgserver, Debian's `postgresql`):
one per test session, a fresh database per test. Without the server's binaries or the psycopg
driver the tests that need them are skipped, saying why; with MICROCOT_REQUIRE_FIDELITY=1 (CI)
they fail instead, since `make setup` installs both."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator

import pytest
from fidelity_fixtures import unavailable

from microcot_host.pgserver import PgServer, PgServerError

_names = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PgServer]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("the PostgreSQL driver psycopg is missing: pip install -e '.[test]' "
                    "(make setup)")
    server = PgServer()
    try:
        server.start()
    except PgServerError as exc:
        unavailable(f"no throwaway PostgreSQL server: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PgServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL (TCP, with the password) of a new, empty database for this test."""
    stem = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40].strip("_")
    name = f"t{next(_names)}_{stem}"
    url = postgres_server.create_database(name)
    try:
        yield url
    finally:
        postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgres"])
def model_store(request: pytest.FixtureRequest) -> str:
    """Where a test's Model lives (model.open_model): an in-memory SQLite, and a new PostgreSQL
    database of the throwaway server (skipped, or failed in CI, without it)."""
    if request.param == "sqlite":
        return ":memory:"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """Emulator(database_url=...): None (SQLite in the data folder), and a new PostgreSQL
    database of the throwaway server."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_url"))
