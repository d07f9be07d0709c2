"""`evaluation.load_run` and the command line's config rule: a run folder supplies its own config."""
import json
import os

import pytest
import torch

import configs
import main
from errors import UserError
from evaluation import load_run

NET = ["--config.model.hidden_dim=16", "--config.model.num_layers=2", "--config.model.embedding_dim=8"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny vp_toy run trained with network overrides (as a user would, through the CLI)."""
    workdir = str(tmp_path_factory.mktemp("runs") / "toy")
    args = ["--mode", "train", "--config", "vp_toy", "--workdir", workdir, *NET, "--config.training.n_iters=20",
            "--config.training.batch_size=32", "--config.training.progress=false",
            "--config.training.plot_samples=0", "--device", "cpu"]
    assert main.main(args) == 0
    return workdir


def test_load_run_gives_config_sde_ema_model_and_score(run_dir):
    from training.checkpoint import restore_model

    run = load_run(run_dir, device="cpu")
    assert run.config.model.hidden_dim == 16 and run.step == 20 and str(run.device) == "cpu"
    assert type(run.sde).__name__ == "VPSDE" and not any(p.requires_grad for p in run.model.parameters())
    ema, _ = restore_model(run.config, run_dir, "cpu", use_ema=True)
    x, t = torch.randn(5, 2), torch.full((5,), 0.3)
    with torch.no_grad():
        expected = ema(x, t)
    torch.testing.assert_close(run.model(x, t), expected)
    score = run.score_fn(x, t)
    assert score.shape == x.shape and torch.isfinite(score).all()
    with pytest.raises(UserError, match="holds no run"):
        load_run(os.path.join(run_dir, "missing"))


def _sample(args, capsys):
    code = main.main(["--mode", "sample", "--solver", "em", "--nfe", "10", "--num_samples", "8", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_mode_uses_the_saved_config_and_refuses_network_changes(run_dir, capsys):
    # --config omitted: the run's config.json; use-time overrides are fine
    code, out, _ = _sample(["--workdir", run_dir, "--config.sampling.batch_size=4", "--device", "cpu"], capsys)
    assert code == 0 and "NFE 10" in out
    # a JSON config path works, and the workdir defaults to its folder
    code, _, _ = _sample(["--config", os.path.join(run_dir, "config.json")], capsys)
    assert code == 0
    # the named config without the training overrides conflicts: one line that says what to do
    code, _, err = _sample(["--config", "vp_toy", "--workdir", run_dir], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "model.hidden_dim" in err and "omit --config" in err
    # an override that would change the network is refused, naming the key and the way out
    code, _, err = _sample(["--workdir", run_dir, "--config.model.hidden_dim=32"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "model.hidden_dim: 16 -> 32" in err
    assert "--mode train --workdir NEW" in err
    # the same values as the run are not a conflict
    code, _, _ = _sample(["--config", "vp_toy", "--workdir", run_dir, *NET], capsys)
    assert code == 0


def test_missing_config_and_bad_device_are_one_line_errors(tmp_path, capsys):
    assert main.main(["--mode", "sample", "--workdir", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no run" in err and "--config" in err
    assert main.main(["--mode", "sample"]) == 2
    assert "--config" in capsys.readouterr().err
    assert main.main(["--mode", "sample", "--config", "vp_toy", "--device", "tpu"]) == 2
    err = capsys.readouterr().err
    assert "device" in err and "cuda:N" in err
    if not torch.cuda.is_available():
        assert main.main(["--mode", "sample", "--config", "vp_toy", "--device", "cuda:0"]) == 2
        assert "--device cpu" in capsys.readouterr().err


def test_json_config_round_trip_keeps_tuples_and_new_keys(tmp_path):
    config = configs.get_config("vp_cifar")
    saved = json.loads(config.to_json())
    del saved["sampling"]["method"]  # a key added to the toolkit after the run was saved
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    loaded = configs.get_config(str(path))
    assert loaded.model.ch_mult == config.model.ch_mult and isinstance(loaded.model.ch_mult, tuple)
    assert loaded.sampling.method is None and loaded.to_dict() == config.to_dict()
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        configs.get_config(str(path))
