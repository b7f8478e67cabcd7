import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


#: Two threads, as on the CI machine; one per process when pytest-xdist runs the tests in two.
THREADS = max(1, 2 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from the same RNG state and thread count."""
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    yield


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Original resnet18 weights, as a user's training run would have saved them."""
    import convert

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(convert.build_model("resnet18").state_dict(), path)
    return path
