"""Helpers shared by process tests (beside the server fixtures of tests/conftest.py)."""
