"""Every kronlin.train optimizer checks its seed like kronlin.torch (``kronlin._validate.check_seed``)."""

from __future__ import annotations

import numpy as np
import pytest

from kronlin.train import get_loss
from kronlin.train.optim import OPTIMIZERS
from train_helpers import tiny_mlp


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("seed, error", [(None, TypeError), (2.5, TypeError), (True, TypeError), ("0", TypeError),
                                         (-1, ValueError)])
def test_seed_checked(name, seed, error):
    """None would seed from the operating system (an unrepeatable run), a float or a bool was passed on."""
    with pytest.raises(error, match="seed must be"):
        OPTIMIZERS[name](tiny_mlp(), get_loss("softmax_ce"), seed=seed)
    assert OPTIMIZERS[name](tiny_mlp(), get_loss("softmax_ce"), seed=np.int64(4)).seed == 4
