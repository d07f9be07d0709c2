"""Exports other tools read: safetensors EMA weights (round trip), PNG folders and NHWC `arr_0` npz samples."""
import glob
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import configs
import main
from errors import UserError
from evaluation.exports import export_ema, load_exported, save_nhwc_npz, save_png_folder, to_nhwc_rgb
from training.checkpoint import restore_model

TINY_DIGITS = ["model.nf=8", "model.ch_mult=(1,)", "model.attn_resolutions=()", "sampling.batch_size=4"]


def _untrained_run(name, overrides, workdir):
    """A checkpoint whose EMA differs from the raw weights (so the export must pick the EMA ones)."""
    import models
    from training.checkpoint import FORMAT_VERSION, checkpoint_path, config_to_json, save_checkpoint

    config = configs.get_config(name)
    configs.apply_overrides(config, overrides)
    torch.manual_seed(0)
    model = models.create_model(config)
    ema = models.ExponentialMovingAverage(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ema.update(model)
    save_checkpoint(checkpoint_path(workdir), {
        "format": FORMAT_VERSION, "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": {},
        "step": 5, "config": config_to_json(config)})
    return config


@pytest.mark.parametrize("name,overrides,shape", [
    ("vp_toy", ["model.hidden_dim=16", "model.num_layers=2", "model.embedding_dim=8"], (7, 2)),
    ("vp_digits", TINY_DIGITS, (3, 1, 8, 8)),
])
def test_safetensors_round_trip_gives_identical_outputs(tmp_path, name, overrides, shape):
    workdir = str(tmp_path / "run")
    config = _untrained_run(name, overrides, workdir)
    weights_path, config_path, step = export_ema(config, workdir)
    assert weights_path == os.path.join(workdir, "export", "ema.safetensors") and step == 5
    assert json.load(open(config_path))["model"]["name"] == config.model.name
    original, _ = restore_model(config, workdir, "cpu", use_ema=True)
    loaded = load_exported(weights_path, config)
    raw, _ = restore_model(config, workdir, "cpu", use_ema=False)
    x, t = torch.randn(shape), torch.rand(shape[0])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), original(x, t))
        assert not torch.equal(raw(x, t), original(x, t))  # the export holds the EMA weights, not the raw ones
    for name_, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name_], tensor), name_


def test_load_exported_refuses_other_networks_and_bad_files(tmp_path):
    workdir = str(tmp_path / "run")
    config = _untrained_run("vp_digits", TINY_DIGITS, workdir)
    weights_path, _, _ = export_ema(config, workdir)
    other = configs.get_config("vp_digits")
    configs.apply_overrides(other, ["model.nf=16", "model.ch_mult=(1,)", "model.attn_resolutions=()"])
    with pytest.raises(UserError, match="different network.*model.nf"):
        load_exported(weights_path, other)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="not a safetensors file"):
        load_exported(str(bad), config)
    with pytest.raises(UserError, match="do not exist"):
        load_exported(str(tmp_path / "missing.safetensors"), config)


def test_export_cli(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    _untrained_run("vp_digits", TINY_DIGITS, workdir)
    code = main.main(["--mode", "export", "--workdir", workdir])
    assert code == 0 and "ema.safetensors" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(workdir, "export", "config.json"))


def test_png_folder_and_nhwc_npz(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (3, 1, 5, 4), dtype=np.uint8)
    rgb = np.random.default_rng(1).integers(0, 256, (2, 3, 5, 4), dtype=np.uint8)
    save_nhwc_npz(str(tmp_path / "gray.npz"), gray)
    with np.load(tmp_path / "gray.npz") as archive:
        assert list(archive.keys()) == ["arr_0"]
        arr = archive["arr_0"]
    assert arr.shape == (3, 5, 4, 3) and arr.dtype == np.uint8
    assert all(np.array_equal(arr[..., c], gray[:, 0]) for c in range(3))
    assert np.array_equal(to_nhwc_rgb(rgb), rgb.transpose(0, 2, 3, 1))
    folder = save_png_folder(str(tmp_path / "png"), rgb)
    assert sorted(os.listdir(folder)) == ["000000.png", "000001.png"]
    with Image.open(os.path.join(folder, "000001.png")) as image:
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), rgb[1].transpose(1, 2, 0))
    save_png_folder(str(tmp_path / "png_gray"), gray)
    with Image.open(tmp_path / "png_gray" / "000002.png") as image:
        assert image.mode == "L" and np.array_equal(np.asarray(image), gray[2, 0])
    with pytest.raises(UserError, match="uint8"):
        save_nhwc_npz(str(tmp_path / "x.npz"), gray.astype(np.float32))


def test_sample_mode_writes_the_exports(tmp_path):
    workdir = str(tmp_path / "run")
    _untrained_run("vp_digits", TINY_DIGITS, workdir)
    code = main.main(["--mode", "sample", "--workdir", workdir, "--solver", "em", "--nfe", "2",
                      "--num_samples", "3"])
    assert code == 0
    # --num_samples 3 is not the run's default: the name carries the settings hash (README, Reliability)
    (npz,) = glob.glob(os.path.join(workdir, "samples", "samples_em_nfe2_seed42_h????????.npz"))
    stem = npz[:-len(".npz")]
    samples = np.load(stem + ".npz")["samples"]
    assert np.array_equal(np.load(stem + "_nhwc.npz")["arr_0"], to_nhwc_rgb(samples))
    assert sorted(os.listdir(stem + "_png")) == [f"{k:06d}.png" for k in range(3)]
