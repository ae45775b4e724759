"""The default training recipe: an epoch count that fits the data, recorded in the run."""

from __future__ import annotations

import pytest

import xdl
from xdl.training.config import MAX_EPOCHS, MIN_EPOCHS, TrainConfig, epoch_budget


@pytest.mark.parametrize("samples, epochs", [(1_293, 6), (3_600, 2), (8_000, MIN_EPOCHS), (60_000, MIN_EPOCHS), (50, MAX_EPOCHS)])
def test_the_default_epoch_count_is_a_budget_of_samples(samples, epochs):
    assert epoch_budget(samples) == epochs
    assert TrainConfig().for_samples(samples).epochs == epochs
    assert TrainConfig(epochs=3).for_samples(samples).epochs == 3  # an explicit count is kept


def test_a_run_records_the_epochs_it_was_given(tmp_path):
    run = xdl.train("digits", "mlp", tmp_path / "run", quiet=True, data_options={"limit": 120},
                    model_options={"hidden": [8]})
    train = len(run.history)
    assert run.info["train"]["epochs"] == train == epoch_budget(run.info["dataset"]["sizes"]["train"])
