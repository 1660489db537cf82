"""Runs side by side in tensorboard (tnas/hparams.py): settings and final metrics as an hparams event."""
import pytest

from tnas.hparams import final_metrics, hparam_values, log_hparams
from tnas.runlog import RunLogger
from tb_events import summary_values

SUMMARY = {"stage": "search", "method": "tnas", "best_val_accuracy": 61.5, "best_epoch": 2, "epochs_done": 3,
           "wall_time_s": 7200.0, "history": [{"train_accuracy": 40.0, "val_accuracy": 50.0},
                                              {"train_accuracy": 55.0, "val_accuracy": 58.25}]}


def test_hparam_values_are_flat_and_tensorboard_typed():
    values = hparam_values({"lr": 0.1, "epochs": 3, "amp": False, "dataset": "glyphs", "threads": None,
                            "betas": [0.5, 0.999], "out": "runs/x", "resume": True, "config": "a.yaml"})
    assert values == {"amp": False, "betas": "[0.5, 0.999]", "dataset": "glyphs", "epochs": 3, "lr": 0.1,
                      "threads": "none"}


def test_final_metrics():
    assert final_metrics(SUMMARY) == {
        "hparam/best_val_accuracy": 61.5, "hparam/best_epoch": 2.0, "hparam/epochs_done": 3.0,
        "hparam/final_train_accuracy": 55.0, "hparam/final_val_accuracy": 58.25, "hparam/wall_time_h": 2.0}
    assert final_metrics({"best_val_accuracy": None, "history": []}) == {}


def test_hparams_event_is_written(tmp_path):
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    (tmp_path / "config.yaml").write_text("meta_lr_weights: 0.003\nepochs: 3\nout: somewhere\nthreads: null\n")
    with RunLogger(tmp_path) as logger:
        assert log_hparams(logger, str(tmp_path), SUMMARY)
    values = summary_values(tmp_path / "tb" / "hparams")
    start = [HParamsPluginData.FromString(value.metadata.plugin_data.content) for tag, _, value in values
             if tag == "_hparams_/session_start_info"]
    assert len(start) == 1
    hparams = start[0].session_start_info.hparams
    assert hparams["meta_lr_weights"].number_value == pytest.approx(0.003)
    assert hparams["epochs"].number_value == 3 and hparams["threads"].string_value == "none"
    assert hparams["stage"].string_value == "search" and hparams["method"].string_value == "tnas"
    assert "out" not in hparams
    experiment = [HParamsPluginData.FromString(value.metadata.plugin_data.content).experiment
                  for tag, _, value in values if tag == "_hparams_/experiment"][0]
    assert {info.name.tag for info in experiment.metric_infos} >= {"hparam/best_val_accuracy", "hparam/final_val_accuracy"}
    scalars = {tag: value.simple_value for tag, _, value in values if value.HasField("simple_value")}
    assert scalars["hparam/best_val_accuracy"] == pytest.approx(61.5)


def test_no_tensorboard_no_event(tmp_path):
    with RunLogger(tmp_path, use_tensorboard=False) as logger:
        assert not log_hparams(logger, str(tmp_path), SUMMARY)
    assert not (tmp_path / "tb").exists()
