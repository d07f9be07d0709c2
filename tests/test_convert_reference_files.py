"""Reference checkpoints load exactly as score_sde_pytorch saves them, and nothing else loads (issue 11).

The files are built here the way the reference's training loop writes them (run_lib.train / utils.save_checkpoint):
`torch.save({'optimizer': Adam.state_dict(), 'model': DataParallel(model).state_dict(), 'ema': {decay,
num_updates, shadow_params}, 'step': int})`, with a real `torch.nn.DataParallel` of our network (whose module
and parameter names are the reference's), a real Adam that has taken steps with the reference's warm-up
(`g['lr'] = lr * np.minimum(step / warmup, 1.0)`: a numpy float64 in the param group), the reference's EMA
update, and the `module.sigmas` buffer the reference networks register. Files saved under numpy 1.x name the
scalar constructor `numpy.core.multiarray.scalar`, under numpy 2.x `numpy._core.multiarray.scalar`; the other
spelling is produced by rewriting the pickle inside the zip archive.
"""
from __future__ import annotations

import math
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

import configs
import models
from errors import UserError
from scripts.convert_score_sde_checkpoint import main as convert_main
from sde_lib import get_sde
from training.checkpoint import checkpoint_path, load_checkpoint, restore_model
from training.convert import load_reference_checkpoint
from training.load_errors import describe_load_error

TINY = ["--config.data.image_size=8", "--config.model.ch_mult=(1, 2)", "--config.model.num_res_blocks=1",
        "--config.model.attn_resolutions=(4,)", "--config.model.dropout=0.0"]
NUMPY_PATHS = ("numpy.core.multiarray", "numpy._core.multiarray")


def tiny_args(name: str) -> list[str]:
    return TINY + [f"--config.model.nf={32 if name == 'ssde_vp_cifar10_ddpm' else 8}"]


def tiny_config(name: str):
    config = configs.get_config(name)
    configs.apply_overrides(config, [a[len("--config."):] for a in tiny_args(name)])
    return config


def reference_training(config, steps: int = 3, warmup: int = 5000, lr: float = 2e-4, decay: float = 0.999):
    """(DataParallel-wrapped network, Adam, EMA dict, step) after `steps` optimization steps as run_lib.train
    makes them (loss: any differentiable function of the network output; what matters is the state)."""
    torch.manual_seed(0)
    net = models.create_model(config)
    with torch.no_grad():  # non-zero weights everywhere (the reference initializes some layers to zero)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = torch.nn.DataParallel(net)  # on a CPU machine it wraps the module without devices
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    shadow, num_updates = [p.clone().detach() for p in trainable], 0
    x = torch.rand(4, 3, 8, 8)
    labels = torch.tensor([0.5, 3.0, 10.0, 20.0]) if config.sde.name == "vesde" else torch.tensor([1.0, 10, 500, 998])
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        model(x, labels).square().mean().backward()
        for g in optimizer.param_groups:  # losses.optimization_manager: warm-up writes a numpy float64
            g["lr"] = lr * np.minimum(step / warmup, 1.0)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
        # models/ema.py ExponentialMovingAverage.update
        num_updates += 1
        d = min(decay, (1 + num_updates) / (10 + num_updates))
        with torch.no_grad():
            for s, p in zip(shadow, trainable):
                s.sub_((1 - d) * (s - p))
    assert isinstance(optimizer.param_groups[0]["lr"], np.float64)
    return model, optimizer, {"decay": decay, "num_updates": num_updates, "shadow_params": shadow}, steps


def save_reference_file(path: str, config, numpy_module: str) -> tuple[torch.nn.Module, dict]:
    """Write a checkpoint in the reference's exact format; returns (the network, the EMA dict)."""
    model, optimizer, ema, step = reference_training(config)
    state_dict = model.state_dict()
    # reference networks register their noise-level table `sigmas` before any sub-module: first in the dict
    sigmas = torch.tensor(np.exp(np.linspace(np.log(config.sde.sigma_max), np.log(config.sde.sigma_min),
                                             config.sde.num_scales)))
    model_state = type(state_dict)([("module.sigmas", sigmas)] + list(state_dict.items()))
    torch.save({"optimizer": optimizer.state_dict(), "model": model_state, "ema": ema, "step": step}, path)
    if numpy_module not in _pickle_globals(path):
        _rename_pickle_module(path, [m for m in NUMPY_PATHS if m != numpy_module][0], numpy_module)
    assert numpy_module in _pickle_globals(path)
    return model.module, ema


def _pickle_name(path: str) -> str:
    with zipfile.ZipFile(path) as archive:
        return next(n for n in archive.namelist() if n.endswith("/data.pkl"))


def _pickle_globals(path: str) -> str:
    with zipfile.ZipFile(path) as archive:
        return archive.read(_pickle_name(path)).decode("latin-1")


def _rename_pickle_module(path: str, old: str, new: str) -> None:
    """Rewrite `old` as `new` in the GLOBAL opcodes of the archive's data.pkl (protocol 2: 'c' module '\\n' name
    '\\n', so the length may change); every other entry is copied as it is and the zip stays valid."""
    target = _pickle_name(path)
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info.filename)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for info, data in entries:
            if info.filename == target:
                assert f"c{old}\nscalar\n".encode() in data
                data = data.replace(f"c{old}\nscalar\n".encode(), f"c{new}\nscalar\n".encode())
            archive.writestr(info.filename, data)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None


def _score(config, model, x, t):
    with torch.no_grad():
        return models.get_score_fn(get_sde(config), model, continuous=config.training.continuous)(x, t)


@pytest.mark.parametrize("numpy_module", NUMPY_PATHS)
@pytest.mark.parametrize("name", ["ssde_ve_cifar10_ncsnpp", "ssde_vp_cifar10_ddpmpp_continuous", "ssde_vp_cifar10_ddpm"])
def test_reference_file_converts_as_saved(tmp_path, capsys, name, numpy_module):
    config = tiny_config(name)
    src = str(tmp_path / "checkpoint_26.pth")
    source_net, ema = save_reference_file(src, config, numpy_module)
    # a plain weights-only load refuses the file (the numpy scalar); ours accepts exactly it
    with pytest.raises(pickle.UnpicklingError):
        torch.load(src, weights_only=True)
    out = str(tmp_path / "run")
    assert convert_main([src, "--config", name, "--out", out] + tiny_args(name)) == 0
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if ln.startswith("not verifiable"))
    if config.sde.name == "vpsde":
        assert "VP and sub-VP" in line and "discrete or continuous" in line and "beta_min" in line
    else:
        assert "VP and sub-VP" not in line and "noise levels" not in line  # checked against the sigmas buffer

    state = load_checkpoint(checkpoint_path(out))  # our own weights-only load: no numpy objects left
    assert state["step"] == 3 and state["ema"]["num_updates"] == 3
    lr = state["optimizer"]["param_groups"][0]["lr"]
    assert type(lr) is float and lr == pytest.approx(2e-4 * 3 / 5000, rel=1e-12)

    # the converted model (EMA weights, what the paper evaluates) computes the source network's score
    converted, _ = restore_model(config, out, "cpu")
    trainable = [p for p in source_net.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, s in zip(trainable, ema["shadow_params"]):
            p.copy_(s)
    source_net.eval()
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([1.0, 0.3, 37 / 999, 0.5 + 0.25 / 999, 0.123456, 1e-3])  # on and off the step grid
    ours, reference = _score(config, converted, x, t), _score(config, source_net, x, t)
    assert torch.isfinite(reference).all() and reference.abs().max() > 0
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)

    # fine-tuning resumes from it: our optimizer takes the converted Adam state
    model = models.create_model(config)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    opt.load_state_dict(state["optimizer"])
    assert len(opt.state_dict()["state"]) == len(trainable)


class _RunsCode:
    """Pickles as a call of os.system: loading it with a plain pickle would run the command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path, capsys):
    config = tiny_config("ssde_ve_cifar10_ncsnpp")
    marker = tmp_path / "code_ran"
    src = str(tmp_path / "evil.pth")
    model, optimizer, ema, step = reference_training(config, steps=1)
    torch.save({"optimizer": optimizer.state_dict(), "model": model.state_dict(), "ema": ema, "step": step,
                "note": _RunsCode(str(marker))}, src)
    out = str(tmp_path / "run")
    assert convert_main([src, "--config", "ssde_ve_cifar10_ncsnpp", "--out", out] + tiny_args("ssde_ve_cifar10_ncsnpp")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "system" in err and "never runs code" in err
    assert not marker.exists() and not os.path.exists(checkpoint_path(out))


@pytest.mark.parametrize("damage,expected", [
    (lambda s: s.__setitem__("step", "abc"), "'step' must be a non-negative integer, got 'abc'"),
    (lambda s: s.__setitem__("step", -7), "'step' must be a non-negative integer, got -7"),
    (lambda s: s["ema"].__setitem__("decay", "x"), "could not convert string to float"),
    (lambda s: s["optimizer"].__setitem__("param_groups", [5]), "can convert"),
    (lambda s: s["optimizer"]["state"].__setitem__(next(iter(s["optimizer"]["state"])), 5), "can convert"),
], ids=["step_text", "step_negative", "decay_text", "group_not_a_dict", "state_not_a_dict"])
def test_hand_made_entries_are_refused_in_one_line(tmp_path, capsys, damage, expected):
    """Entries of the wrong type in an otherwise loadable file (before: ValueError / AttributeError tracebacks, and
    a negative step converted "successfully" and was refused only by main.py afterwards)."""
    config = tiny_config("ssde_ve_cifar10_ncsnpp")
    model, optimizer, ema, step = reference_training(config, steps=1)
    state = {"optimizer": optimizer.state_dict(), "model": model.state_dict(), "ema": ema, "step": step}
    damage(state)
    src, out = str(tmp_path / "hand_made.pth"), str(tmp_path / "run")
    torch.save(state, src)
    capsys.readouterr()
    assert convert_main([src, "--config", "ssde_ve_cifar10_ncsnpp", "--out", out]
                        + tiny_args("ssde_ve_cifar10_ncsnpp")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0] and expected in err[0], err
    assert not os.path.exists(checkpoint_path(out))


def test_the_allowlist_is_only_the_numpy_scalar(tmp_path):
    """A numpy array (numpy.core.multiarray._reconstruct, which the reference never saves) is refused too."""
    config = tiny_config("ssde_ve_cifar10_ncsnpp")
    before = list(torch.serialization.get_safe_globals())
    model, optimizer, ema, step = reference_training(config, steps=1)
    opt = optimizer.state_dict()
    opt["param_groups"][0]["lr"] = np.array([1e-4, 2e-4])
    src = str(tmp_path / "array.pth")
    torch.save({"optimizer": opt, "model": model.state_dict(), "ema": ema, "step": step}, src)
    with pytest.raises(UserError) as info:
        load_reference_checkpoint(src)
    message = str(info.value)
    assert "_reconstruct" in message and "\n" not in message
    # and a float32 numpy scalar needs a dtype class that is not on the list either
    opt["param_groups"][0]["lr"] = np.float32(1e-4)
    torch.save({"optimizer": opt, "model": model.state_dict(), "ema": ema, "step": step}, src)
    with pytest.raises(UserError, match="Float32DType|not among"):
        load_reference_checkpoint(src)
    assert set(torch.serialization.get_safe_globals()) == set(before)  # the allowlist does not outlive the load


def _messages(tmp_path) -> dict[str, str]:
    """describe_load_error for each way a file can fail to load."""
    good = str(tmp_path / "good.pth")
    torch.save({"w": torch.randn(1000)}, good)
    data = open(good, "rb").read()
    cases = {"truncated": data[: len(data) // 2], "tail cut": data[:-40], "empty": b"",
             "random": np.random.default_rng(0).bytes(4096), "text": b"hello\n"}
    legacy = str(tmp_path / "legacy.pth")
    torch.save({"w": torch.randn(1000)}, legacy, _use_new_zipfile_serialization=False)
    legacy_data = open(legacy, "rb").read()
    cases["legacy truncated"] = legacy_data[: len(legacy_data) // 2]
    out = {}
    for name, content in cases.items():
        path = tmp_path / f"{name}.pth"
        path.write_bytes(content)
        with pytest.raises(Exception) as info:
            torch.load(str(path), weights_only=True)
        out[name] = describe_load_error(info.value)
    evil = str(tmp_path / "evil.pth")
    torch.save({"x": _RunsCode(str(tmp_path / "never"))}, evil)
    with pytest.raises(Exception) as info:
        torch.load(evil, weights_only=True)
    out["code"] = describe_load_error(info.value)
    with pytest.raises(Exception) as info:
        torch.save({"lr": np.float64(1.0)}, good)
        torch.load(good, weights_only=True)  # torch's message has ANSI bold codes in it
    out["numpy"] = describe_load_error(info.value)
    return out


def test_load_errors_are_one_clean_sentence(tmp_path):
    messages = _messages(tmp_path)
    for name, message in messages.items():
        assert "\n" not in message and "\x1b" not in message and "\t" not in message, (name, message)
        assert 20 < len(message) < 260, (name, message)
        assert not message.rstrip(")").endswith(("is", "the", "your checkpoint file is", ",")), (name, message)
    assert "truncated or damaged" in messages["truncated"] and "truncated or damaged" in messages["tail cut"]
    assert "ends early" in messages["empty"] and "ends early" in messages["legacy truncated"]
    assert "not a PyTorch checkpoint" in messages["random"] and "not a PyTorch checkpoint" in messages["text"]
    assert "system" in messages["code"] and "numpy._core.multiarray.scalar" in messages["numpy"]


def test_truncated_files_are_reported_in_full_by_both_loaders(tmp_path):
    good = str(tmp_path / "good.pth")
    torch.save({"w": torch.randn(1000)}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(open(good, "rb").read()[:700])
    with pytest.raises(UserError) as info:
        load_reference_checkpoint(str(cut))
    assert str(info.value).endswith("the file is truncated or damaged (its zip archive has no central directory)")
    with pytest.raises(UserError) as info:
        load_checkpoint(str(cut))
    message = str(info.value)
    assert "truncated or damaged" in message and message.endswith("point --workdir elsewhere")
    assert "\n" not in message and "\x1b" not in message


def test_reference_sigmas_are_float64_in_the_file(tmp_path):
    """The reference's table comes from numpy float64 (torch.tensor keeps it): the converter compares it to
    the config's noise levels and drops it."""
    config = tiny_config("ssde_ve_cifar10_ncsnpp")
    src = str(tmp_path / "c.pth")
    save_reference_file(src, config, "numpy._core.multiarray")
    state = load_reference_checkpoint(src)
    sigmas = state["model"]["module.sigmas"]
    assert sigmas.dtype == torch.float64 and math.isclose(float(sigmas[0]), 50.0)
    assert list(state["model"])[0] == "module.sigmas"
