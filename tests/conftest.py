import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests run from a checkout with or without `pip install -e .`.
sys.path.insert(0, os.path.join(ROOT, "plugin"))


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A tiny demo data set (``train.rec``, ``demo_lfw.bin``, ``demo_hard.bin``, ``ijb/``),
    generated once for the tests that only read it: 8 training identities of 4 images, IJB
    templates from 6 identities of 4 images."""
    from otface.demo import generate_demo

    return generate_demo(
        tmp_path_factory.mktemp("tiny_demo") / "data",
        train_identities=8,
        images_per_identity=4,
        val_identities=4,
        val_images_per_identity=3,
        val_pairs=20,
        hard_identities=3,
        hard_images_per_identity=2,
        hard_pairs=6,
        ijb_identities=6,
        ijb_images_per_identity=4,
        ijb_impostor_pairs=40,
    )


# The longest tests (tens of seconds each on the 2-core CI machine) run first, so that the two
# test processes do not finish with one of them running alone. Only the order changes.
_LONG_FIRST = (
    "test_first_run.py::",
    "test_custom_data_doc.py::test_walkthrough_runs_as_written",
    "test_packaging.py::test_a_wheel_installs_offline",
    "test_train_reliability.py::test_ranks_at_different_steps",
    "test_train.py::test_two_compiled_ranks_equal_one_process",
)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not any(name in item.nodeid for name in _LONG_FIRST))
