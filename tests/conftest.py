"""The suite's fixtures are in :mod:`tests.helpers.fixtures`, loaded by every process that runs tests
(:mod:`tests.helpers.fixture_plugin`: not by xdist's controller, which runs none)."""

from __future__ import annotations

import pytest

from tests.helpers.fixture_plugin import load_fixtures


def pytest_configure(config: pytest.Config) -> None:
    load_fixtures(config)
