"""tnas.stages.restore: a trained learner back from a checkpoint of any stage, or one error line."""
import os

import pytest
import torch

from tnas.errors import TnasError
from tnas.checkpoints import load_checkpoint, save_checkpoint
from tnas.stages import restore


def assert_same_model(learner, saved_model_state):
    mine = learner.model.state_dict()
    assert set(mine) == set(saved_model_state)
    for name, value in saved_model_state.items():
        assert torch.equal(mine[name], value), name


def one_line(error):
    text = str(error.value)
    assert "\n" not in text
    return text


def test_tnas_search_checkpoint(runs):
    from tnas.meta.tnas import TNAS

    learner, summary = restore.learner_from_checkpoint(runs["search"], "cpu")  # a run directory -> best.pt
    state = load_checkpoint(runs["search"] / "best.pt")
    assert isinstance(learner, TNAS)
    assert summary["stage"] == "search" and summary["method"] == "tnas"
    assert_same_model(learner, state["learner"]["model"])
    assert set(learner.inner_lrs) == {"weights", "alphas"}  # T-NAS adapts both
    assert learner.inner_steps_test == state["summary"]["learner"]["inner_steps_test"]
    # The optimisers come back too (their step counts).
    saved = state["learner"]["optimizers"]["alphas"]["state"]
    restored = learner.optimizers["alphas"].state_dict()["state"]
    assert set(saved) == set(restored) and all(torch.equal(saved[k]["step"], restored[k]["step"]) for k in saved)
    genotype = restore.checkpoint_genotype(learner, summary)
    assert genotype == learner.genotype()


def test_train_checkpoint(runs):
    import json

    from tnas.genotypes import genotype_from_dict

    learner, summary = restore.learner_from_checkpoint(runs["train"] / "best.pt", "cpu")
    state = load_checkpoint(runs["train"] / "best.pt")
    assert summary["stage"] == "train" and summary["method"] == "maml"
    assert_same_model(learner, state["learner"]["model"])
    genotype = genotype_from_dict(json.loads((runs["train"] / "genotype.json").read_text()))
    assert restore.checkpoint_genotype(learner, summary) == genotype
    assert learner.model.genotype == genotype


def _auto_maml_checkpoint(runs, path):
    """An auto-MAML search checkpoint with the search run's supernet weights."""
    state = load_checkpoint(runs["search"] / "best.pt")
    summary = dict(state["summary"], method="auto_maml")
    summary["learner"] = {k: v for k, v in summary["learner"].items() if k != "inner_lr_alphas"}
    from tnas.meta.auto_maml import AutoMAML, AutoMAMLConfig
    from tnas.models.supernet import Supernet

    learner = AutoMAML(Supernet(**summary["model"]), AutoMAMLConfig.from_dict(summary["learner"]))
    learner.model.load_state_dict(state["learner"]["model"])
    save_checkpoint({"stage": "search", "summary": summary, "learner": learner.state_dict()}, path)
    return state


def test_auto_maml_search_checkpoint(runs, tmp_path):
    state = _auto_maml_checkpoint(runs, tmp_path / "auto.pt")
    learner, summary = restore.learner_from_checkpoint(tmp_path / "auto.pt", "cpu")
    assert summary["method"] == "auto_maml"
    assert_same_model(learner, state["learner"]["model"])
    assert "alphas" not in learner.inner_lrs  # auto-MAML adapts the weights only


@pytest.mark.parametrize("change, fragment", [
    ({"stage": "finetune"}, "unknown checkpoint stage 'finetune'"),
    ({"summary_method": "darts"}, "unknown search method 'darts'"),
])
def test_unknown_stage_or_method(runs, tmp_path, change, fragment):
    state = load_checkpoint(runs["search"] / "best.pt")
    if "stage" in change:
        state["stage"] = change["stage"]
    else:
        state["summary"] = dict(state["summary"], method=change["summary_method"])
    path = tmp_path / "odd.pt"
    save_checkpoint(state, path)
    with pytest.raises(TnasError) as error:
        restore.learner_from_checkpoint(path, "cpu")
    assert fragment in one_line(error) and str(path) in str(error.value)


def test_missing_corrupt_and_foreign_files(runs, tmp_path):
    with pytest.raises(TnasError) as error:
        restore.learner_from_checkpoint(tmp_path / "none.pt", "cpu")
    assert "checkpoint not found" in one_line(error)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02garbage")
    with pytest.raises(TnasError) as error:
        restore.learner_from_checkpoint(corrupt, "cpu")
    assert "cannot read checkpoint" in one_line(error)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    with pytest.raises(TnasError) as error:
        restore.learner_from_checkpoint(foreign, "cpu")
    assert "not a tnas run checkpoint" in one_line(error) and "'stage'" in str(error.value)


def test_run_directory_without_best(runs, tmp_path):
    (tmp_path / "last.pt").write_bytes((runs["search"] / "last.pt").read_bytes())
    with pytest.raises(TnasError) as error:
        restore.resolve_checkpoint(tmp_path)
    assert "no best.pt" in one_line(error) and os.path.join(str(tmp_path), "last.pt") in str(error.value)


def test_weights_that_do_not_fit_the_summary(runs, tmp_path):
    state = load_checkpoint(runs["search"] / "best.pt")
    state["summary"] = dict(state["summary"], model=dict(state["summary"]["model"], C=6))
    path = tmp_path / "mismatch.pt"
    save_checkpoint(state, path)
    with pytest.raises(TnasError) as error:
        restore.learner_from_checkpoint(path, "cpu")
    assert "do not fit" in one_line(error) and str(path) in str(error.value)


@pytest.mark.filterwarnings("ignore:.*meta parameter")
def test_a_graphed_runs_optimiser_state_resumes_eagerly_with_step_counters_on_the_cpu():
    """A run trained with CUDA graphs saves capturable optimisers, whose Adam ``step`` counters torch
    keeps on the parameters' GPU; torch's loader keeps them there for an eager resume too, and every
    eager Adam step would then read each one back to the host. Parameters on the 'meta' device stand
    in for the GPU here: the counters must come back on the CPU, and the optimisers keep their own
    (eager) settings."""
    from tnas.meta.tnas import TNAS, TNASConfig
    from tnas.models.supernet import Supernet

    def learner(device):
        torch.manual_seed(0)
        model = Supernet(n_way=3, C=4, layers=1, steps=2, multiplier=2, in_channels=1).to(device)
        return TNAS(model, TNASConfig(inner_steps=1, inner_lr_weights=0.1, inner_lr_alphas=3.0))

    graphed = learner("cpu")
    for optimizer in graphed.optimizers.values():
        for param in optimizer.param_groups[0]["params"]:
            param.grad = torch.ones_like(param)
        optimizer.step()
        optimizer.step()
    state = graphed.state_dict()
    for saved in state["optimizers"].values():  # as make_optimizers_capturable leaves a graphed run's groups
        for group in saved["param_groups"]:
            group["capturable"] = True
    eager = learner("meta")
    eager.load_state_dict(state)
    for name, optimizer in eager.optimizers.items():
        assert [group["capturable"] for group in optimizer.param_groups] == [False], name
        steps = [entry["step"] for entry in optimizer.state.values()]
        assert steps and all(step.device.type == "cpu" and step.dim() == 0 and float(step) == 2.0
                             for step in steps), name
        assert all(entry["exp_avg"].device.type == "meta" for entry in optimizer.state.values())
    assert all(group["capturable"] for saved in state["optimizers"].values() for group in saved["param_groups"])
