"""The catastrophic-overfitting guard of --adv-train fgsm: when it stops, what it keeps, what it records."""

from __future__ import annotations

import pytest
import torch

import xdl
from xdl.training.coguard import CatastrophicOverfitGuard
from xdl.training.config import TrainConfig


def test_guard_keeps_the_peak_and_stops_on_collapse():
    data = xdl.load_data("digits", limit=120)
    guard = CatastrophicOverfitGuard(data, 0.1, torch.device("cpu"))
    model = torch.nn.Linear(1, 1)
    stops = []
    for epoch, accuracy in enumerate([0.30, 0.52, 0.45, 0.40, 0.25], start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        stops.append(guard.update(model, epoch, accuracy))
    # 0.45 and 0.40 are within 20 points of the 0.52 peak; 0.25 is a collapse (and under half).
    assert stops == [False, False, False, False, True]
    assert guard.best_epoch == 2 and guard.best_state["weight"].item() == 2
    assert "epoch 2 kept" in guard.message


def test_fgsm_training_records_pgd_accuracy_and_stops_on_collapse(tmp_path, monkeypatch):
    # A scripted collapse: PGD accuracy 0.4 → 0.6 → 0.05, as Wong et al. 2020 saw with α = 2·eps.
    scripted = iter([0.4, 0.6, 0.05, 0.05, 0.05])
    monkeypatch.setattr(CatastrophicOverfitGuard, "measure", lambda self, model: next(scripted))
    weights = {}

    real_update = CatastrophicOverfitGuard.update

    def update(self, model, epoch, accuracy):
        weights[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        return real_update(self, model, epoch, accuracy)

    monkeypatch.setattr(CatastrophicOverfitGuard, "update", update)
    run = xdl.train("digits", "mlp", tmp_path / "r", epochs=5, quiet=True, adv_train="fgsm", adv_eps=0.1, adv_step=2.0,
                    data_options={"limit": 200}, model_options={"hidden": [16]})
    history = run.history
    assert [r["epoch"] for r in history] == [1, 2, 3]  # stopped at the collapse
    assert [r["pgd_accuracy"] for r in history] == [0.4, 0.6, 0.05]
    kept = run.model.state_dict()
    assert all(torch.equal(kept[k].cpu(), weights[2][k].cpu()) for k in kept)  # the peak epoch's weights


def test_adv_step_is_validated():
    with pytest.raises(xdl.XdlError, match="adv-step"):
        TrainConfig(adv_train="fgsm", adv_step=0)
