"""Moved to tests/conftest.py; left only for tests/test_generate.py, which imports `tiny_pipeline` from here.
Delete this file once it imports from conftest."""

from conftest import tiny_pipeline

__all__ = ["tiny_pipeline"]
