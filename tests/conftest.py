import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, os.cpu_count() or 1))

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


@pytest.fixture
def golden():
    """Compare text with tests/golden/<name>.txt (FXOPT_UPDATE_GOLDEN=1 rewrites the file)."""
    def check(name: str, text: str):
        path = os.path.join(GOLDEN, f"{name}.txt")
        if os.environ.get("FXOPT_UPDATE_GOLDEN") or not os.path.exists(path):
            if not os.environ.get("FXOPT_UPDATE_GOLDEN") and os.environ.get("CI"):
                pytest.fail(f"golden file {path} missing")
            with open(path, "w") as f:
                f.write(text)
        with open(path) as f:
            assert text == f.read(), f"IR differs from {path}; FXOPT_UPDATE_GOLDEN=1 to accept"
    return check


@pytest.fixture(autouse=True)
def _quiet_export_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test, restored after (small training loops run faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def search_data():
    """The digits split the budget and mixed-precision searches use: validation (their
    eval_fn) carved from the training images and never trained or distilled on, and the
    test split, which checks the chosen model on images the search never saw."""
    from fxopt.examples import Digits, digits
    d = digits()
    n = 300
    fit = Digits(d.x_train[n:], d.y_train[n:], d.x_test, d.y_test)
    return {"fit": fit, "val": (d.x_train[:n], d.y_train[:n]), "test": (d.x_test, d.y_test),
            "calib": [(fit.x_train[i:i + 64],) for i in range(0, len(fit.x_train), 64)],
            "example": (fit.x_train[:64],)}
