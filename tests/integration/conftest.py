"""Shared fixtures for integration tests: the demo dataset (generated once, as the default job does)."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_DIR = os.path.join(ROOT, "data", "demo")


@pytest.fixture(scope="session")
def demo_data():
    """The default demo dataset under data/demo (generated when missing; deterministic)."""
    from compress.data.demo import generate_demo_data
    generate_demo_data(DEMO_DIR, show_progress=False)
    return DEMO_DIR


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
