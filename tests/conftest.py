"""Shared fixtures live in tests/fixtures/, one module per area."""

pytest_plugins = [
    "tests.fixtures.images",
    "tests.fixtures.models",
    "tests.fixtures.moondream_cache",
    "tests.fixtures.s3",
    "tests.fixtures.ray",
]
