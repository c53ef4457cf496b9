"""Fixtures of the stage tests."""

import pytest


@pytest.fixture
def outside_repo(tmp_path_factory, monkeypatch):
    """Run in an empty folder: a stage command without `--params` reads ./params.yaml when there is one, and these
    tests call stages with their own flags only (the built-in defaults under them), not the repository's settings."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
