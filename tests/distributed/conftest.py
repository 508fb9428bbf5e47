"""The multi-process tests' shared fixture: the tiny pipeline and its datasets, built once per module (a module that
needs other assets defines its own ``assets``, which takes precedence)."""

from tests.helpers.distributed import assets  # noqa: F401  (a fixture, found by pytest under its name)
