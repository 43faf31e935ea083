import pytest

from deem.data.synth import synth_world


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    synth_world(root, seed=0, num_train=40, num_test=10)
    return root
