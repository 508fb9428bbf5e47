"""The multi-process tests' shared fixture: the tiny pipeline and its datasets, built once per module (a module that
needs other assets defines its own ``assets``, which takes precedence). Its helpers are imported when it runs, not
when an xdist controller reads this file."""

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    from tests.helpers.distributed import distributed_assets

    return distributed_assets(tmp_path_factory.mktemp("distributed"))
