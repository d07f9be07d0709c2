"""`main.py --mode sample` / `--mode eval`: files written, facts recorded, real checkpoint restore, clear errors."""
import glob
import json
import os

import numpy as np
import pytest

import configs
import main
from data import toy_mixture
from evaluation import sample_runner
from sde_lib import get_sde


def _write_untrained_checkpoint(config, workdir):
    """A checkpoint of an untrained network in the training engineer's format (restored through the real path)."""
    import models
    from training.checkpoint import FORMAT_VERSION, checkpoint_path, config_to_json, save_checkpoint

    model = models.create_model(config)
    ema = models.ExponentialMovingAverage(model, float(config.model.ema_rate))
    save_checkpoint(checkpoint_path(workdir), {
        "format": FORMAT_VERSION, "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": {},
        "step": 7, "config": config_to_json(config)})


SMALL = ["--config.model.hidden_dim=16", "--config.model.num_layers=2", "--config.model.embedding_dim=8",
         "--config.sampling.batch_size=64"]


def test_sample_cli_with_a_real_checkpoint(tmp_path):
    config = configs.get_config("vp_toy")
    configs.apply_overrides(config, [a[len("--config."):] for a in SMALL])
    workdir = str(tmp_path / "run")
    _write_untrained_checkpoint(config, workdir)
    code = main.main(["--mode", "sample", "--config", "vp_toy", "--workdir", workdir, "--solver", "em",
                      "--nfe", "20", "--num_samples", "100", "--seed", "3", *SMALL])
    assert code == 0
    (npz,) = glob.glob(os.path.join(workdir, "samples", "samples_em_nfe20_seed3_h*.npz"))  # non-default settings
    stem = npz[:-len(".npz")]
    samples = np.load(stem + ".npz")["samples"]
    assert samples.shape == (100, 2) and np.isfinite(samples).all()
    info = json.load(open(stem + ".json"))
    assert info["solver"] == "em" and info["nfe_requested"] == 20 and info["nfe_used"] == 20
    assert info["seed"] == 3 and info["checkpoint_step"] == 7 and info["nfe_used_per_batch"] == [20, 20]
    assert os.path.getsize(stem + ".png") > 0
    # the same seed gives the same samples
    main.main(["--mode", "sample", "--config", "vp_toy", "--workdir", workdir, "--solver", "em",
               "--nfe", "20", "--num_samples", "100", "--seed", "3", *SMALL])
    assert np.array_equal(np.load(stem + ".npz")["samples"], samples)


@pytest.fixture
def exact_score(monkeypatch):
    """Replace the checkpoint by the exact score of the config's mixture (quality is then known)."""
    def load(config, workdir, device):
        sde = get_sde(config)
        return sde, toy_mixture(str(config.data.dataset)).score_fn(sde), 0
    monkeypatch.setattr(sample_runner, "load_score_fn", load)


def test_sample_cli_uses_config_sampling_options(tmp_path, exact_score):
    workdir = str(tmp_path)
    code = main.main(["--mode", "sample", "--config", "ve_toy", "--workdir", workdir, "--nfe", "200",
                      "--num_samples", "500", "--config.sampling.snr=0.1", "--config.sampling.batch_size=500"])
    assert code == 0
    (npz,) = glob.glob(os.path.join(workdir, "samples", "samples_pc_nfe200_seed42_h*.npz"))
    info = json.load(open(npz[:-len(".npz")] + ".json"))
    assert info["solver"] == "pc" and info["options"]["snr"] == 0.1 and info["options"]["predictor"]
    samples = np.load(npz)["samples"]
    assert abs(np.linalg.norm(samples, axis=1).mean() - 2.0) < 0.05  # ring of radius 2


def test_eval_cli_reports_quality_near_the_noise_floor(tmp_path, exact_score, capsys):
    workdir = str(tmp_path)
    code = main.main(["--mode", "eval", "--config", "vp_toy", "--workdir", workdir, "--solver", "ode_rk4",
                      "--nfe", "100", "--num_samples", "1000", "--config.sampling.batch_size=1000"])
    assert code == 0
    (path,) = glob.glob(os.path.join(workdir, "eval", "eval_ode_rk4_nfe100_seed42_h*.json"))
    report = json.load(open(path))
    assert report["nfe_used"] == 100
    assert report["sw2"] < 2 * report["sw2_noise_floor"]
    assert report["mode_tv"] < report["mode_tv_noise_floor"] + 0.04
    assert abs(report["logp_gap"]) < 0.15
    assert "sw2" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--solver", "nope"], "unknown solver"),
    (["--nfe", "0"], "must be positive"),
    ([], "no checkpoint"),
])
def test_sample_cli_errors_are_one_line(tmp_path, capsys, argv, match):
    code = main.main(["--mode", "sample", "--config", "vp_toy", "--workdir", str(tmp_path / "empty"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and match in err and "Traceback" not in err


def test_progress_label_shows_the_batches_actually_sampled():
    """64 samples at batch size 256 are one batch of 64, not "1x256"; a short last batch is shown apart."""
    assert sample_runner.batches_label([64]) == "1x64"
    assert sample_runner.batches_label([256, 256, 256]) == "3x256"
    assert sample_runner.batches_label([256, 256, 100]) == "2x256+1x100"
    assert sample_runner.batches_label([]) == "0 batches"
