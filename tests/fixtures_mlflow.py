"""Shared pytest fixtures (registered in conftest.py)."""
