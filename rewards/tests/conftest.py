"""The ports' tests: tiny reward models built from configs in the test, on CPU; nothing is downloaded.

Run from the repository's root (``python -m pytest -q`` collects them with the core's tests): its pytest settings put
the root on the path, whose ``tests.helpers.evaluation`` builds the tiny CLIP models both suites use, and whose
``tests.helpers.fixtures`` (loaded here too, once per process) sets torch's thread count.
"""

from __future__ import annotations

import pytest

from tests.helpers.fixture_plugin import load_fixtures


def pytest_configure(config: pytest.Config) -> None:
    load_fixtures(config)
