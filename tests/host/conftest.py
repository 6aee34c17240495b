"""Fixtures shared by the host tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pg_fixtures import (  # noqa: F401  (fixtures, defined there)
    database_url,
    model_store,
    postgres_server,
    postgres_url,
)

from microcot_host.vboard import VirtualBoard


@pytest.fixture
def virtual_board(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[VirtualBoard]:
    """A started virtual board with a fresh flash directory; stopped after the test.

    Options come from `@pytest.mark.virtual_board(heap=..., iccid=..., mac=...)`.
    """
    marker = request.node.get_closest_marker("virtual_board")
    kwargs = dict(marker.kwargs) if marker else {}
    kwargs.setdefault("name", "t-" + request.node.name[:40].strip("_").replace("[", "-")
                      .replace("]", "").replace("/", "-"))
    kwargs.setdefault("flash_dir", tmp_path_factory.mktemp("flash"))
    vb = VirtualBoard(**kwargs).start()
    try:
        yield vb
    finally:
        vb.stop()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "virtual_board(**kwargs): options of the virtual_board fixture's board")
