"""The ports' tests, a package so that their ``conftest`` is ``tests.conftest`` here, never the core suite's
``conftest`` module (both are collected from the repository's root in one run)."""
