"""The FID/KID/IS pipeline on torch-fidelity's Inception with random weights (no download), and its weights handling.

The network at 299x299 is slow on a CPU: a handful of images per call, one network per module.
"""
import json
import os

import numpy as np
import pytest
import torch

import configs
import main
from errors import UserError
from evaluation import inception
from evaluation.image_eval import ImageQuality
from evaluation.image_metrics import feature_statistics, frechet_distance_to_features, inception_features
from evaluation.reference_stats import reference_statistics


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A state dict saved from a randomly initialised instance of the library's Inception."""
    return inception.random_inception_weights(str(tmp_path_factory.mktemp("inception") / "random.pth"), seed=0,
                                              calibration_images=2)


@pytest.fixture(scope="module")
def network(weights):
    return inception.build_inception(weights)


def _images(n, channels=3, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8)


def test_features_shapes_uint8_batching_and_determinism(network):
    gray = _images(3, channels=1)
    pool, logits = inception_features(gray, network, batch_size=2)
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008) and pool.dtype == np.float64
    assert np.isfinite(pool).all() and pool.std(axis=0).mean() > 1e-3  # not a degenerate random network
    # batching does not change the features; the same input gives the same features
    again, _ = inception_features(gray, network, batch_size=3)
    np.testing.assert_allclose(again, pool, rtol=1e-4, atol=1e-5 * np.abs(pool).max())
    # grayscale is the same plane in R, G, B; NHWC input is accepted
    rgb_nhwc = np.repeat(gray, 3, axis=1).transpose(0, 2, 3, 1)
    via_rgb, _ = inception_features(rgb_nhwc, network, batch_size=3)
    assert np.array_equal(via_rgb, again)
    with pytest.raises(UserError, match="uint8"):
        inception_features(gray.astype(np.float32) / 255, network)


def test_any_input_size_is_resized_inside_the_network(network):
    # bilinear resizing of a constant image is exact at any size: 8x8 and 40x40 give the same 299x299 input
    values = np.array([30, 200], dtype=np.uint8)[:, None, None, None]
    small = np.broadcast_to(values, (2, 3, 8, 8)).copy()
    big = np.broadcast_to(values, (2, 3, 40, 40)).copy()
    pool_small, logits_small = inception_features(small, network)
    pool_big, logits_big = inception_features(big, network)
    np.testing.assert_allclose(pool_big, pool_small, rtol=1e-5, atol=1e-5 * np.abs(pool_small).max())
    np.testing.assert_allclose(logits_big, logits_small, rtol=1e-5, atol=1e-5 * np.abs(logits_small).max())
    assert np.abs(pool_small[0] - pool_small[1]).max() > 1e-3 * np.abs(pool_small).max()


def _folder_config(tmp_path, weights, n=4):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for k, image in enumerate(_images(n, seed=10)):
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{k}.png")
    config = configs.get_config("vp_digits")
    config.data.dataset, config.data.path, config.data.num_channels = "image_folder", str(folder), 3
    config.eval.inception_weights = weights
    config.eval.kid_reference_features = 3
    config.eval.isc_splits = 2
    return config, folder


def test_reference_statistics_are_cached_and_invalidated(tmp_path, weights, network):
    config, folder = _folder_config(tmp_path, weights)
    info = inception.describe(weights)
    first = reference_statistics(config, "train", network, info, progress=False)
    assert not first["cached"] and first["num_images"] == 4 and first["features"].shape == (3, 2048)
    assert os.path.dirname(first["path"]) == str(folder / "fid_stats")  # next to the data
    record = json.load(open(first["path"].replace(".npz", ".json")))["record"]
    assert record["inception"]["weights_sha256"] == info["weights_sha256"] and record["num_files"] == 4
    second = reference_statistics(config, "train", network, info, progress=False)
    assert second["cached"] and np.array_equal(second["mu"], first["mu"])
    assert np.array_equal(second["sigma"], first["sigma"]) and np.array_equal(second["features"], first["features"])
    # a changed data file makes the cache stale: recomputed, and the new statistics differ
    from PIL import Image

    Image.fromarray(_images(1, seed=99)[0].transpose(1, 2, 0)).save(folder / "0.png")
    os.utime(folder / "0.png", ns=(1, 1))
    third = reference_statistics(config, "train", network, info, progress=False)
    assert not third["cached"] and not np.array_equal(third["mu"], first["mu"])
    # a damaged npz is recomputed too (and the same images give the same numbers: deterministic)
    with open(third["path"], "wb") as handle:
        handle.write(b"not an npz")
    fourth = reference_statistics(config, "train", network, info, progress=False)
    assert not fourth["cached"] and np.array_equal(fourth["mu"], third["mu"])
    # so is a truncated one (a zip archive without its end: zipfile.BadZipFile, once a traceback)
    data = open(fourth["path"], "rb").read()
    with open(fourth["path"], "wb") as handle:
        handle.write(data[:len(data) // 2])
    fifth = reference_statistics(config, "train", network, info, progress=False)
    assert not fifth["cached"] and np.array_equal(fifth["mu"], third["mu"])


def test_fingerprint_sees_the_images_behind_a_folder_link(tmp_path, weights):
    """The statistics' fingerprint lists the files the loader reads, links included: deleting images behind a
    link makes the cache stale (before: os.walk did not follow links and the old statistics stayed in use)."""
    from evaluation.reference_stats import data_fingerprint

    config, folder = _folder_config(tmp_path, weights)
    other = tmp_path / "other"
    other.mkdir()
    for name in ("0.png", "1.png"):
        (other / name).write_bytes((folder / name).read_bytes())
    (folder / "linked").symlink_to(other, target_is_directory=True)
    before = data_fingerprint(config, "train")
    assert before["num_files"] == 6
    (other / "1.png").unlink()
    after = data_fingerprint(config, "train")
    assert after["num_files"] == 5 and after["files_sha256"] != before["files_sha256"]


def test_image_quality_of_the_data_itself(tmp_path, weights):
    config, folder = _folder_config(tmp_path, weights)
    config.eval.stats_dir = str(tmp_path / "stats")
    quality = ImageQuality(config, "train", progress=False)
    from data.images import load_image_folder

    data = load_image_folder(str(folder), 8, 3)
    metrics = quality(data)
    scale = np.trace(quality.reference["sigma"])
    assert metrics["fid"] < 1e-6 * scale  # FID(x, x) ~ 0
    assert metrics["num_samples"] == 4 and metrics["split"] == "train" and metrics["reference_num_images"] == 4
    assert metrics["kid_subset_size"] == 3 and metrics["inception"]["weights_sha256"]
    assert metrics["inception_score"] >= 1.0 - 1e-9
    noise = quality(_images(4, seed=5))
    assert noise["fid"] > 1e3 * max(metrics["fid"], 1e-12)


def test_missing_weights_is_one_line_without_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(inception, "_online", lambda *a, **k: False)
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: pytest.fail("no download when offline"))
    with pytest.raises(UserError) as error:
        inception.resolve_weights("")
    message = str(error.value)
    assert "\n" not in message and inception.WEIGHTS_URL in message and "eval.inception_weights" in message
    assert inception.hub_weights_path().startswith(str(tmp_path / "torch_home"))
    # the CLI: one line, exit code 2, before any checkpoint or sampling is needed
    code = main.main(["--mode", "eval", "--config", "vp_digits", "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and inception.WEIGHTS_URL in err
    with pytest.raises(UserError, match="is not a file"):
        inception.resolve_weights(str(tmp_path / "nope.pth"))
    # online but the download fails: the same line and the reason, no traceback
    import urllib.error

    def refused(*args, **kwargs):
        raise urllib.error.URLError("connection refused")

    monkeypatch.setattr(inception, "_online", lambda *a, **k: True)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refused)
    with pytest.raises(UserError, match="download failed.*connection refused") as error:
        inception.resolve_weights("")
    assert "\n" not in str(error.value) and inception.WEIGHTS_URL in str(error.value)


def test_weights_files_are_checked(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(2)}, bad)
    with pytest.raises(UserError, match="do not fit"):
        inception.build_inception(str(bad))
    pickled = tmp_path / "code.pth"
    torch.save({"x": object()}, pickled)  # needs unpickling of arbitrary objects: refused
    with pytest.raises(UserError, match="cannot be used: it refers to (builtins.)?object, which is not among"):
        inception.load_weights(str(pickled))
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    hostile = tmp_path / "hostile.pth"
    torch.save({"conv.weight": Payload()}, hostile)
    with pytest.raises(UserError, match=r"cannot be used: it refers to (posix|os)\.system") as error:
        inception.load_weights(str(hostile))
    assert "\n" not in str(error.value) and "weights_only" not in str(error.value) and not marker.exists()


@pytest.mark.skipif(not os.path.isfile(inception.hub_weights_path()), reason="real Inception weights not present")
def test_real_weights_when_present():
    path = inception.resolve_weights("", download=False)
    assert inception.file_sha256(path).startswith(inception.WEIGHTS_SHA256_PREFIX)
    net = inception.build_inception(path)
    images = _images(4, seed=3, size=32)
    pool, logits = inception_features(images, net)
    assert np.isfinite(pool).all() and (pool >= 0).all() and logits.shape == (4, 1008)
    mu, sigma = feature_statistics(pool)
    assert frechet_distance_to_features(pool, mu, sigma) < 1e-6 * np.trace(sigma)


def test_training_callback_every_k_steps(tmp_path, weights, capsys):
    workdir = str(tmp_path / "run")
    code = main.main(["--mode", "train", "--config", "vp_digits", "--workdir", workdir,
                      "--config.model.nf=8", "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()",
                      "--config.training.n_iters=2", "--config.training.batch_size=4", "--config.training.plot_samples=0",
                      "--config.training.progress=false", "--config.sampling.solver=em", "--config.sampling.nfe=2",
                      "--config.eval.fid_every=1", "--config.eval.fid_num_samples=2",
                      "--config.eval.reference_num_images=3", "--config.eval.kid_reference_features=3",
                      f"--config.eval.stats_dir={tmp_path / 'stats'}", f"--config.eval.inception_weights={weights}"])
    assert code == 0
    out = capsys.readouterr().out
    assert "FID" in out and "(2 samples vs 3 train images)" in out
    summary = json.load(open(os.path.join(workdir, "train_summary.json")))
    assert {"fid", "kid", "inception_score"} <= set(summary["metrics"])
    for step in (1, 2):
        report = json.load(open(os.path.join(workdir, "eval", f"fid_train_step{step}.json")))
        assert report["step"] == step and report["num_samples"] == 2 and report["solver"] == "em"
        assert report["nfe_used"] == 2 and report["split"] == "train" and report["reference_num_images"] == 3
    assert summary["metrics"]["fid"] == pytest.approx(report["fid"])


@pytest.mark.parametrize("problem", ["truncated_weights", "too_many_reference_images"])
def test_training_with_fid_refuses_what_would_fail_later_before_the_first_step(tmp_path, weights, capsys, problem):
    """Both used to fail at the first FID step, after training (the steps since the last snapshot were lost)."""
    workdir = str(tmp_path / "run")
    bad = {"truncated_weights": [f"--config.eval.inception_weights={tmp_path / 'cut.pth'}"],
           "too_many_reference_images": [f"--config.eval.inception_weights={weights}",
                                         "--config.eval.reference_num_images=5000"]}[problem]
    (tmp_path / "cut.pth").write_bytes(open(weights, "rb").read()[:100000])
    code = main.main(["--mode", "train", "--config", "vp_digits", "--workdir", workdir,
                      "--config.model.nf=8", "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()",
                      "--config.training.n_iters=2", "--config.training.batch_size=4",
                      "--config.training.plot_samples=0", "--config.training.progress=false",
                      "--config.eval.fid_every=1", "--config.eval.fid_num_samples=2",
                      f"--config.eval.stats_dir={tmp_path / 'stats'}", *bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert ("Inception weights" in err[0]) if problem == "truncated_weights" else ("5000" in err[0] and "1797" in err[0])
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # refused before any training step


def test_compare_solvers_reports_fid_per_solver_and_nfe(tmp_path, weights):
    import importlib.util

    from test_exports import TINY_DIGITS, _untrained_run

    spec = importlib.util.spec_from_file_location("compare_solvers", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "compare_solvers.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    workdir = str(tmp_path / "run")
    _untrained_run("vp_digits", TINY_DIGITS + [f"eval.stats_dir={tmp_path / 'stats'}", "eval.reference_num_images=3",
                                               "eval.kid_reference_features=3"], workdir)
    out = str(tmp_path / "cmp")
    assert script.main(["--workdir", workdir, "--solvers", "em", "--nfe", "1,2", "--num_samples", "2",
                        "--inception_weights", weights, "--out", out]) == 0
    lines = open(out + ".csv").read().splitlines()
    assert lines[0].startswith("solver,setting,nfe_requested,nfe_used,fid,kid,inception_score")
    assert [line.split(",")[:4] for line in lines[2:]] == [["em", "nfe=1", "1", "1"], ["em", "nfe=2", "2", "2"]]
    assert "#### FID" in open(out + ".md").read()
    # without weights: the one line, naming bits/dim as the other way
    with pytest.raises(UserError, match="is not a file.*--mode likelihood"):
        script.main(["--workdir", workdir, "--inception_weights", str(tmp_path / "none.pth"), "--out", out, "--force"])


def test_inception_loads_without_torchvision(monkeypatch):
    import sys

    for name in [m for m in sys.modules if m == "torch_fidelity" or m.startswith("torch_fidelity.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` now fails, as a broken install does
    cls = inception.inception_class()
    assert cls.__name__ == "FeatureExtractorInceptionV3" and cls.get_default_feature_layer_for_metric("fid") == "2048"
    assert "torch_fidelity.feature_extractor_clip" not in sys.modules  # the package __init__ did not run


def test_eval_cli_prints_and_writes_fid_kid_is(tmp_path, weights, capsys):
    from test_exports import TINY_DIGITS, _untrained_run

    workdir = str(tmp_path / "run")
    _untrained_run("vp_digits", TINY_DIGITS, workdir)
    code = main.main(["--mode", "eval", "--workdir", workdir, "--solver", "em", "--nfe", "1", "--num_samples", "2",
                      f"--config.eval.inception_weights={weights}", f"--config.eval.stats_dir={tmp_path / 'stats'}",
                      "--config.eval.reference_num_images=3", "--config.eval.kid_reference_features=3"])
    assert code == 0
    out = capsys.readouterr().out
    assert "FID" in out and "KID" in out and "IS" in out and "(2 samples vs 3 train images)" in out
    (name,) = os.listdir(os.path.join(workdir, "eval"))  # eval_em_nfe1_seed42_h<settings hash>.json
    assert name.startswith("eval_em_nfe1_seed42")
    report = json.load(open(os.path.join(workdir, "eval", name)))
    assert report["num_samples"] == 2 and report["split"] == "train" and report["solver"] == "em"
    assert report["nfe_used"] == 1 and report["fid"] >= 0 and report["kid_subset_size"] == 2
    assert report["reference_num_images"] == 3 and len(report["channel_mean"]) == 1


@pytest.mark.parametrize("override,key", [("eval.kid_subsets=0", "eval.kid_subsets"),
                                          ("eval.batch_size=-1", "eval.batch_size")])
def test_bad_eval_settings_are_one_line(tmp_path, capsys, override, key):
    code = main.main(["--mode", "eval", "--config", "vp_digits", "--workdir", str(tmp_path / "run"),
                      f"--config.{override}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and key in err and len(err.splitlines()) == 1


def test_eval_reports_against_another_split_or_data_get_other_names(tmp_path):
    """An eval report depends on its reference (split, data path, image count): other references, other names;
    the config's own reference keeps the readable name. Sample files do not depend on it."""
    import argparse

    import configs
    from evaluation.sample_runner import output_stem

    config = configs.get_config("vp_digits")

    def stem(kind, split=None, eval_settings=None, **data):
        run = configs.get_config("vp_digits")
        run.data.update(data)
        run.eval.update(eval_settings or {})
        args = argparse.Namespace(config="vp_digits", solver="em", nfe=10, split=split,
                                  num_samples=int(config.sampling.num_samples))
        return output_stem(run, args, str(tmp_path / "none"), kind)[0]

    base = stem("eval")
    assert base.endswith(f"eval_em_nfe10_seed{config.seed}")  # the config's own reference: the readable name
    others = {stem("eval", split="test"), stem("eval", path="/elsewhere"),
              # how the metrics are computed (once: a report with kid_subset_size 8 replaced one with 1000)
              stem("eval", eval_settings={"kid_subset_size": 8}), stem("eval", eval_settings={"isc_splits": 3}),
              stem("eval", eval_settings={"inception_weights": "/weights/other.pth"})}
    assert len(others | {base}) == 6
    assert stem("eval", split=str(config.eval.split)) == base
    assert stem("samples", path="/elsewhere") == stem("samples")
