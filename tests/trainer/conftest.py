import os

# Nothing in the trainer tests may reach a model hub. huggingface_hub reads these once, at
# import, so they are set here, before any test module imports transformers.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402

from demo.base_model import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def trained_base(tmp_path_factory):
    """The default tiny model (what `feedloop model init` builds), once per session (~40 s quiet).

    The recipe tests need its full pretraining: only then is the rare skill clearly above
    chance (~0.7 pairwise; half the pretraining gives ~0.53), so forgetting it is visible.
    """
    return build_tiny_model(tmp_path_factory.mktemp("trained-base"))

