"""Loading the suite's fixtures where tests run. Under ``-n``, xdist's controller imports the conftest files and runs
no test: the conftests import only this module, so the controller spends none of the libraries' imports (~12 s on a
2-core machine) before it starts the workers."""

from __future__ import annotations

import pytest

FIXTURES = "tests.helpers.fixtures"


def runs_tests(config: pytest.Config) -> bool:
    """Whether this process runs tests: an xdist worker, or a run without distribution (``-n 0`` or none; the
    negation of ``xdist.is_xdist_controller``'s test, read off the config)."""
    return hasattr(config, "workerinput") or config.getoption("dist", "no") == "no"


def load_fixtures(config: pytest.Config) -> None:
    """:data:`FIXTURES` (the fixtures, torch's thread count, the per-test hook) registered as a plugin, once, in a
    process that runs tests; nothing in an xdist controller."""
    if runs_tests(config):
        config.pluginmanager.import_plugin(FIXTURES)
