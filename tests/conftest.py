import os
import tempfile

import pytest

# One Inductor cache for the whole run (set before torch is imported by any test module).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "simigrad-test-inductor-cache"))
os.environ.setdefault("TRITON_INTERPRET", "1")

# Marked groups that the default command deselects (reported as deselected, never as passed), with the option
# that selects them: .ci/run runs each in its own step.
GROUPS = {"slow": "--slow", "census": "--census"}


def pytest_addoption(parser):
    for marker, option in GROUPS.items():
        parser.addoption(option, action="store_true", help=f"run only the tests marked {marker}")


def pytest_collection_modifyitems(config, items):
    wanted = [m for m, option in GROUPS.items() if config.getoption(option)]
    keep, drop = [], []
    for item in items:
        marks = {m for m in GROUPS if item.get_closest_marker(m)}
        (keep if (marks & set(wanted) if wanted else not marks) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
