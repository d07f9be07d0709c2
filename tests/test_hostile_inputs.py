"""Hostile inputs through the CLI (issue 12): exit code 2, one line on stderr, no traceback, no file changed.

Every case runs `main.main(argv)` in-process on a copy of one small run (a tiny MLP checkpoint on the ring, a
tiny U-Net checkpoint on 8x8 digits, earlier outputs of sample/likelihood, input images and masks); a
snapshot of every file's size, mtime and SHA-256 under the test folder is compared before and after.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

import configs
import main
from training.checkpoint import CHECKPOINT_NAME, checkpoint_path, load_checkpoint

TOY = ["--config.model.hidden_dim=16", "--config.model.num_layers=2", "--config.model.embedding_dim=8",
       "--config.device=cpu"]
DIGITS = ["--config.model.nf=8", "--config.model.ch_mult=(1, 2)", "--config.model.attn_resolutions=()",
          "--config.data.num_channels=1", "--config.device=cpu"]


def _config(name, overrides):
    config = configs.get_config(name)
    configs.apply_overrides(config, [a[len("--config."):] for a in overrides])
    return config


def _checkpoint(config, workdir):
    from test_sample_cli import _write_untrained_checkpoint

    _write_untrained_checkpoint(config, workdir)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """toy/ (checkpoint + earlier sample and likelihood outputs), digits/ (checkpoint), inputs (npz, masks)."""
    root = tmp_path_factory.mktemp("hostile_base")
    toy = str(root / "toy")
    _checkpoint(_config("vp_toy", TOY), toy)
    assert main.main(["--mode", "sample", "--config", "vp_toy", "--workdir", toy, "--nfe", "4",
                      "--num_samples", "20", *TOY]) == 0
    assert main.main(["--mode", "likelihood", "--config", "vp_toy", "--workdir", toy, "--num_batches", "1",
                      "--config.likelihood.batch_size=4", "--config.likelihood.rtol=1e-2",
                      "--config.likelihood.atol=1e-2", *TOY]) == 0
    _checkpoint(_config("vp_digits", DIGITS), str(root / "digits"))
    rng = np.random.default_rng(0)
    np.savez(root / "images.npz", images=(rng.random((2, 1, 8, 8)) * 255).astype(np.uint8))
    np.savez(root / "empty.npz", images=np.zeros((0, 1, 8, 8), np.uint8))
    np.savez(root / "objects.npz", images=np.array([{"a": 1}, None], dtype=object))
    (root / "garbage.npz").write_bytes(rng.bytes(300))
    np.savez(root / "strings.npz", images=np.array([["a", "b"], ["c", "d"]]))
    gray = np.ones((8, 8), np.float32)
    gray[:, 4:] = 0.3
    np.savez(root / "mask_gray.npz", mask=gray)
    nan = np.ones((8, 8), np.float32)
    nan[0, 0] = np.nan
    np.savez(root / "mask_nan.npz", mask=nan)
    return root


def _snapshot(root) -> dict:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                digest = hashlib.sha256(handle.read()).hexdigest()
            stat = os.stat(path)
            out[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns, digest)
    return out


# --- damage done to a copy of the run before the command (part of the case) ---------------------------------------
def _edit_checkpoint(workdir, **fields):
    path = checkpoint_path(workdir)
    state = load_checkpoint(path)
    for key, value in fields.items():
        if key == "nan_model":
            next(iter(state["model"].values()))[0] = float("nan")
        elif key == "inf_ema":
            state["ema"]["shadow_params"][-1].view(-1)[0] = float("inf")
        else:
            state[key] = value
    torch.save(state, path)  # raw write: a checkpoint damaged or made by another tool (no checksum)


def _flip_byte(workdir, where):
    path = checkpoint_path(workdir)
    data = bytearray(open(path, "rb").read())
    data[int(len(data) * where)] ^= 0x40
    open(path, "wb").write(bytes(data))


def _replace_file(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def _make_folder(path):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "keep.txt"), "w") as handle:
        handle.write("a folder where a file would go")


def _sample_npz_path(workdir):
    from evaluation.sample_runner import output_stem

    import argparse
    config = _config("vp_toy", TOY)
    args = argparse.Namespace(config="vp_toy", solver=None, nfe=None, num_samples=None, class_label=None,
                              guidance=None, guidance_scale=None)
    return output_stem(config, args, workdir, "samples")[0] + ".npz"


def _digits_png_export_path(workdir):
    from evaluation.sample_runner import output_stem

    import argparse
    config = _config("vp_digits", DIGITS)
    args = argparse.Namespace(config="vp_digits", solver=None, nfe=2, num_samples=2, class_label=None,
                              guidance=None, guidance_scale=None)
    return output_stem(config, args, workdir, "samples")[0] + "_png"


def _edit_config_json(workdir, **sections):
    import json

    from training.checkpoint import config_to_json

    saved = json.loads(config_to_json(_config("vp_toy", TOY)))
    saved.update(sections)
    with open(os.path.join(workdir, "config.json"), "w") as handle:
        json.dump(saved, handle)


R = np.random.default_rng(1)
SAMPLE, LIKELIHOOD, TRAIN = ("sample", "vp_toy"), ("likelihood", "vp_toy"), ("train", "vp_toy")
INPAINT, INTERP = ("inpaint", "vp_digits"), ("interpolate", "vp_digits")

# (id, (mode, config), extra argv, expected words in the error, damage(workdir) or None)
CASES = [
    # flags
    ("nfe_zero", SAMPLE, ["--nfe", "0"], "--nfe must be positive", None),
    ("nfe_negative", SAMPLE, ["--nfe", "-5"], "--nfe must be positive", None),
    ("nfe_huge", SAMPLE, ["--nfe", "10000000"], "at most 100000", None),
    ("num_samples_zero", SAMPLE, ["--num_samples", "0"], "--num_samples must be positive", None),
    ("num_samples_huge", SAMPLE, ["--num_samples", "100000000000"], "--num_samples", None),
    ("seed_negative", SAMPLE, ["--seed", "-1"], "--seed", None),
    ("guidance_nan", SAMPLE, ["--guidance", "cfg", "--class_label", "1", "--guidance_scale", "nan"],
     "--guidance_scale must be a finite number", None),
    ("guidance_inf", SAMPLE, ["--guidance", "cfg", "--class_label", "1", "--guidance_scale", "inf"],
     "--guidance_scale", None),
    ("guidance_negative_huge", SAMPLE, ["--guidance", "classifier", "--class_label", "1",
                                        "--guidance_scale=-1e30"], "--guidance_scale", None),
    ("flag_without_value", SAMPLE, ["--guidance_scale", "-1e30"], "expected one argument", None),
    ("flag_not_a_number", SAMPLE, ["--nfe", "ten"], "invalid int value", None),
    ("num_frames_zero", INTERP, ["--num_frames", "0"], "--num_frames", None),
    ("num_frames_one", INTERP, ["--num_frames", "1"], "--num_frames", None),
    ("likelihood_solver_flag", LIKELIHOOD, ["--solver", "pc"], "--solver does not apply to --mode likelihood", None),
    ("likelihood_nfe_flag", LIKELIHOOD, ["--nfe", "5"], "--nfe does not apply to --mode likelihood", None),
    ("num_batches_zero", LIKELIHOOD, ["--num_batches", "0"], "--num_batches must be positive", None),
    ("num_batches_negative", LIKELIHOOD, ["--num_batches", "-3"], "--num_batches", None),
    # config values
    ("sampling_num_samples_zero", SAMPLE, ["--config.sampling.num_samples=0"], "sampling.num_samples", None),
    ("sampling_eps_negative", SAMPLE, ["--solver", "ode", "--config.sampling.eps=-0.1"], "sampling.eps must be in",
     None),
    ("sampling_eps_one", SAMPLE, ["--config.sampling.eps=1"], "sampling.eps must be in (0, 0.1]", None),
    ("sampling_eps_beyond_T", SAMPLE, ["--config.sampling.eps=1.5"], "sampling.eps", None),
    ("sampling_eps_nan", SAMPLE, ["--config.sampling.eps=nan"], "sampling.eps", None),
    ("ve_eps_close_to_T", ("sample", "ve_toy"), ["--workdir", "{root}/ve_run", "--config.sampling.eps=0.99"],
     "sampling.eps", None),
    ("s_churn_text", SAMPLE, ["--solver", "edm_stochastic", "--config.sampling.s_churn=abc"], "sampling.s_churn",
     None),
    ("s_tmax_nan", SAMPLE, ["--config.sampling.s_tmax=nan"], "sampling.s_tmax", None),
    ("snr_negative", SAMPLE, ["--solver", "pc", "--config.sampling.snr=-1"], "sampling.snr", None),
    ("snr_zero", SAMPLE, ["--config.sampling.snr=0"], "sampling.snr", None),
    ("sampling_batch_zero", SAMPLE, ["--config.sampling.batch_size=0"], "sampling.batch_size", None),
    ("n_steps_negative", SAMPLE, ["--config.sampling.n_steps_each=-1"], "sampling.n_steps_each", None),
    ("train_batch_absurd", TRAIN, ["--config.training.batch_size=1000000000000"], "would need about", None),
    ("lr_huge", TRAIN, ["--config.training.lr=1e39"], "training.lr", None),
    ("lr_zero", TRAIN, ["--config.training.lr=0"], "training.lr", None),
    ("lr_nan", TRAIN, ["--config.training.lr=nan"], "training.lr", None),
    ("n_iters_zero", TRAIN, ["--config.training.n_iters=0"], "training.n_iters", None),
    ("n_iters_huge", TRAIN, ["--config.training.n_iters=100000000000"], "training.n_iters", None),
    ("training_eps_zero", TRAIN, ["--config.training.eps=0"], "training.eps", None),
    ("warmup_negative", TRAIN, ["--config.training.warmup=-1"], "training.warmup", None),
    ("ema_rate_above_one", TRAIN, ["--config.model.ema_rate=1.5"], "model.ema_rate", None),
    ("grad_clip_nan", TRAIN, ["--config.training.grad_clip=nan"], "training.grad_clip", None),
    ("likelihood_eps_negative", LIKELIHOOD, ["--config.likelihood.eps=-0.1"], "likelihood.eps", None),
    ("likelihood_eps_one", LIKELIHOOD, ["--config.likelihood.eps=1"], "likelihood.eps", None),
    ("likelihood_rtol_zero", LIKELIHOOD, ["--config.likelihood.rtol=0"], "likelihood.rtol", None),
    ("likelihood_error_norm_unknown", LIKELIHOOD, ["--config.likelihood.error_norm=l2"], "likelihood.error_norm",
     None),
    ("likelihood_method_unknown", LIKELIHOOD, ["--config.likelihood.method=rk45"], "likelihood.method", None),
    # a fixed-step method would take one step over [eps, T] (the CLI has no step size to give it)
    ("likelihood_method_fixed_step", LIKELIHOOD, ["--config.likelihood.method=rk4"], "likelihood.method", None),
    ("likelihood_divergence_unknown", LIKELIHOOD, ["--config.likelihood.divergence=hutchplus"],
     "likelihood.divergence", None),
    ("likelihood_batch_zero", LIKELIHOOD, ["--config.likelihood.batch_size=0"], "likelihood.batch_size", None),
    ("likelihood_batch_absurd", LIKELIHOOD, ["--config.likelihood.batch_size=100000000000000"], "would need",
     None),
    # 10^6 toy points fit with one probe (about 1 GiB), not with 10,000 batched probe vectors (about 2.5 TiB)
    ("likelihood_probes_memory", LIKELIHOOD, ["--config.likelihood.batch_size=1000000",
                                              "--config.likelihood.n_probes=10000"], "would need", None),
    ("num_dequant_zero", LIKELIHOOD, ["--config.likelihood.num_dequant=0"], "likelihood.num_dequant", None),
    ("beta_max_negative", SAMPLE, ["--config.sde.beta_max=-1"], "sde.beta_max", None),
    ("num_scales_zero", SAMPLE, ["--config.sde.num_scales=0"], "sde.num_scales", None),
    ("config_seed_negative", SAMPLE, ["--config.seed=-5"], "seed", None),
    ("snapshot_every_zero", TRAIN, ["--config.training.snapshot_every=0"], "training.snapshot_every", None),
    ("likelihood_atol_negative", LIKELIHOOD, ["--config.likelihood.atol=-1"], "likelihood.atol", None),
    ("unknown_split", LIKELIHOOD, ["--split", "validation"], "unknown split", None),
    ("unknown_solver", SAMPLE, ["--solver", "magic"], "unknown solver", None),
    ("data_dim_zero", SAMPLE, ["--config.data.dim=0"], "data.dim", None),
    ("config_nfe_huge", SAMPLE, ["--config.sampling.nfe=1000000"], "sampling.nfe", None),
    ("classifier_lr_inf", ("train_classifier", "vp_toy"), ["--config.classifier.lr=inf"], "classifier.lr", None),
    # output locations
    ("workdir_is_a_file", TRAIN, [], "is a file, not a folder", lambda w: _replace_file(w + "_file", b"x")),
    ("workdir_in_proc", TRAIN, ["--workdir", "/proc/nope/run"], "cannot write to --workdir /proc/nope/run", None),
    ("samples_is_a_file", SAMPLE, [], "is a file, not a folder",
     lambda w: shutil.rmtree(os.path.join(w, "samples")) or _replace_file(os.path.join(w, "samples"), b"")),
    ("checkpoints_is_a_file", TRAIN, [], "is a file, not a folder",
     lambda w: shutil.rmtree(os.path.join(w, "checkpoints")) or _replace_file(os.path.join(w, "checkpoints"), b"")),
    ("results_path_is_a_folder", SAMPLE, [], "it is a folder", lambda w: _make_folder(_sample_npz_path(w))),
    ("likelihood_is_a_file", LIKELIHOOD, [], "is a file, not a folder",
     lambda w: shutil.rmtree(os.path.join(w, "likelihood")) or _replace_file(os.path.join(w, "likelihood"), b"")),
    # damaged run state
    ("checkpoint_step_negative", SAMPLE, [], "field 'step' must be a non-negative integer",
     lambda w: _edit_checkpoint(w, step=-5)),
    ("checkpoint_step_text", TRAIN, [], "field 'step'", lambda w: _edit_checkpoint(w, step="abc")),
    ("checkpoint_config_not_json", LIKELIHOOD, [], "field 'config'", lambda w: _edit_checkpoint(w, config="{oops")),
    ("checkpoint_nan_model", SAMPLE, [], "NaN/inf", lambda w: _edit_checkpoint(w, nan_model=True)),
    ("checkpoint_inf_ema_resume", TRAIN, [], "NaN/inf", lambda w: _edit_checkpoint(w, inf_ema=True)),
    ("checkpoint_byte_flip_middle", SAMPLE, [], "does not match the checksum", lambda w: _flip_byte(w, 0.5)),
    ("checkpoint_byte_flip_header", LIKELIHOOD, [], "does not match the checksum", lambda w: _flip_byte(w, 0.0001)),
    ("checkpoint_byte_flip_end", TRAIN, [], "does not match the checksum", lambda w: _flip_byte(w, 0.9999)),
    ("checkpoint_truncated", SAMPLE, [], "does not match the checksum",
     lambda w: _replace_file(checkpoint_path(w), open(checkpoint_path(w), "rb").read()[:-100])),
    ("checkpoint_zero_bytes", SAMPLE, [], CHECKPOINT_NAME, lambda w: _replace_file(checkpoint_path(w), b"")),
    # a raw pickle (not torch's zip format): torch used to print a two-line UserWarning before the error
    ("checkpoint_raw_pickle", SAMPLE, [], CHECKPOINT_NAME,
     lambda w: _replace_file(checkpoint_path(w), pickle.dumps({"format": 1}, protocol=4))),
    ("classifier_random_bytes", SAMPLE, ["--guidance", "classifier", "--class_label", "1"], "classifier.pt",
     lambda w: _replace_file(os.path.join(w, "classifier.pt"), R.bytes(4096))),
    ("classifier_zero_bytes", SAMPLE, ["--guidance", "classifier", "--class_label", "1"], "classifier.pt",
     lambda w: _replace_file(os.path.join(w, "classifier.pt"), bytes(4096))),
    # input files
    ("inpaint_zero_images", INPAINT, ["--input", "{root}/empty.npz", "--mask", "left"], "holds no images", None),
    ("inpaint_object_npz", INPAINT, ["--input", "{root}/objects.npz", "--mask", "left"], "Python objects", None),
    ("inpaint_garbage_npz", INPAINT, ["--input", "{root}/garbage.npz", "--mask", "left"], "cannot read", None),
    ("mask_gray", INPAINT, ["--input", "{root}/images.npz", "--mask", "{root}/mask_gray.npz"], "only 0", None),
    ("mask_nan", INPAINT, ["--input", "{root}/images.npz", "--mask", "{root}/mask_nan.npz"], "NaN", None),
    ("inpaint_text_npz", INPAINT, ["--input", "{root}/strings.npz", "--mask", "left"], "expected numbers", None),
    ("mask_text_npz", INPAINT, ["--input", "{root}/images.npz", "--mask", "{root}/strings.npz"], "expected numbers",
     None),
    # a hand-edited config.json: sections, switches and names keep their kind
    ("config_json_section_is_a_number", SAMPLE, [], "model must be a section", lambda w: _edit_config_json(w, model=5)),
    ("config_json_device_is_a_number", SAMPLE, [], "device must be text", lambda w: _edit_config_json(w, device=5)),
    # export paths are checked before sampling, not after it
    ("png_export_path_is_a_file", ("sample", "vp_digits"), ["--num_samples", "2", "--nfe", "2"],
     "is a file, not a folder", lambda w: _replace_file(_digits_png_export_path(w), b"x")),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_refused_in_one_line_and_changes_nothing(case, base, tmp_path, capsys):
    name, (mode, config), extra, expected, damage = case
    root = tmp_path / "root"
    shutil.copytree(base, root)
    workdir = str(root / ("digits" if config == "vp_digits" else "toy"))
    if damage is not None:
        damage(workdir)
    if name == "workdir_is_a_file":
        workdir += "_file"
    overrides = DIGITS if config == "vp_digits" else TOY
    argv = ["--mode", mode, "--config", config, "--workdir", workdir, *overrides,
            *[a.replace("{root}", str(root)) for a in extra]]
    before = _snapshot(root)
    capsys.readouterr()
    code = main.main(argv)
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2, (name, out.err, out.out[-500:])
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert "Traceback" not in out.err and expected in lines[0], lines[0]
    for hint in ("allow_pickle", "weights_only"):
        assert hint not in lines[0]
    assert _snapshot(root) == before, f"{name}: files changed"


def test_at_least_forty_hostile_inputs():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def test_read_only_output_folder_is_found_before_any_work(base, tmp_path, capsys, monkeypatch):
    """A read-only file system (simulated: root ignores permission bits) is refused before the checkpoint loads."""
    import errno
    import tempfile

    import validation

    root = tmp_path / "root"
    shutil.copytree(base, root)
    workdir = str(root / "toy")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    loaded = []
    monkeypatch.setattr("training.checkpoint.restore_model", lambda *a, **k: loaded.append(1))
    before = _snapshot(root)
    code = main.main(["--mode", "sample", "--config", "vp_toy", "--workdir", workdir, *TOY])
    err = capsys.readouterr().err
    assert code == 2 and "read-only file system" in err and len(err.strip().splitlines()) == 1
    assert not loaded and _snapshot(root) == before
    assert validation.MAX_NFE == 100_000


def test_allow_large_lifts_the_budget_bound(capsys):
    """--allow_large accepts what the sane bound refuses (here the run then stops at the missing checkpoint)."""
    code = main.main(["--mode", "sample", "--config", "vp_toy", "--workdir", "/nonexistent/run", "--nfe",
                      "200000", "--allow_large"])
    err = capsys.readouterr().err
    assert code == 2 and "no checkpoint" in err


def test_valid_guidance_and_mask_values_pass_validation():
    """The range checks accept the edges they name (w = 0 and w = 100; masks of exactly 0/1 or uint8 0/255)."""
    import validation

    assert validation.check_real("--guidance_scale", 0.0, 0.0, 100.0) == 0.0
    assert validation.check_real("--guidance_scale", 100.0, 0.0, 100.0) == 100.0
    mask = validation.check_binary_mask(np.array([[0, 255]], np.uint8), "m.png")
    assert mask.tolist() == [[0.0, 1.0]]
    assert validation.check_time("sampling.eps", 1e-5, 1.0) == 1e-5
    with pytest.raises(validation.UserError, match=r"\(0, 0.1\]"):
        validation.check_time("sampling.eps", 0.5, 1.0)


@pytest.mark.slow
def test_the_real_command_line_exits_2_with_one_line(tmp_path):
    """The same contract through `python main.py` (three of the cases, run at once; slow: three interpreter starts,
    the in-process table above is the default check)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cases = [(["--mode", "train", "--config", "vp_toy", "--workdir", "/proc/nope/run"], "/proc/nope/run"),
             (["--mode", "train", "--config", "vp_toy", "--workdir", str(tmp_path / "a"),
               "--config.training.lr=1e39"], "training.lr"),
             (["--mode", "sample", "--config", "vp_toy", "--workdir", str(tmp_path / "b"),
               "--config.sampling.num_samples=0"], "sampling.num_samples")]
    procs = [(subprocess.Popen([sys.executable, os.path.join(root, "main.py"), *argv], cwd=str(tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), expected)
             for argv, expected in cases]
    for proc, expected in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
        assert "Traceback" not in err and not out
    assert os.listdir(tmp_path) == []


def test_likelihood_memory_estimate_counts_the_probe_vectors():
    """The batched VJP carries n_probes vectors (2 n_probes for Hutch++): the same batch fits with one probe."""
    import configs
    from errors import UserError
    from validation import likelihood_vjp_vectors, validate_memory

    config = configs.get_config("vp_toy")
    config.model.hidden_dim, config.model.num_layers, config.device = 16, 2, "cpu"
    lk = config.likelihood
    lk.batch_size = 1_000_000  # 34 floats per point: about 1 GiB with one probe
    validate_memory(config, "likelihood")
    assert likelihood_vjp_vectors(lk) == 1
    lk.n_probes = 10_000
    with pytest.raises(UserError, match="likelihood.batch_size=1000000 would need"):
        validate_memory(config, "likelihood")
    lk.divergence, lk.n_probes = "hutchpp", 3
    assert likelihood_vjp_vectors(lk) == 6
    lk.divergence = "exact"
    assert likelihood_vjp_vectors(lk) == 1
