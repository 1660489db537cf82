"""tnas.stages.settings: typed stage settings, flat flags in and out, rerun-free comparison."""
import pytest

from tnas.stages.settings import differences
from tnas.stages.train import TrainSettings


def test_flags_round_trip_through_nested_settings():
    settings = TrainSettings.from_flags({"genotype": "auto_maml_1shot", "n_way": 3, "epochs": 2, "C": 8,
                                         "method": "maml++", "cosine_lr": False, "device": "cpu", "config": "x.yaml"})
    assert (settings.data.n_way, settings.schedule.epochs, settings.network.C) == (3, 2, 8)
    assert settings.maml.method == "maml++" and settings.maml.cosine_lr is False and settings.run.device == "cpu"
    flags = settings.to_flags()
    assert "config" not in flags and flags["n_way"] == 3 and flags["k_shot"] == 1  # unset: the default
    assert TrainSettings.from_flags(flags) == settings


def test_replace_changes_flags_wherever_they_live():
    settings = TrainSettings()
    changed = settings.replace(epochs=3, out="runs/x", inner_lr=0.5)
    assert (changed.schedule.epochs, changed.run.out, changed.maml.inner_lr) == (3, "runs/x", 0.5)
    assert settings.schedule.epochs == 15  # frozen: the original is untouched
    with pytest.raises(TypeError):
        settings.replace(no_such_flag=1)


def test_differences_ignore_rerun_free_fields():
    base = TrainSettings.from_flags({"genotype": "a", "out": "runs/a", "device": "cpu", "log_every": 1})
    same_run = base.replace(genotype="b", out="runs/b", device="cuda", log_every=50, data_path="/d", amp=True)
    assert differences(base, same_run) == []
    other = base.replace(inner_lr=0.3, n_way=3)
    assert differences(base, other) == [("n_way", 5, 3), ("inner_lr", 0.01, 0.3)]
