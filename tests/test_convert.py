"""Converting reference Score-SDE checkpoints (issue 7): names, shapes, EMA, block outputs, errors, time labels.

The reference parameter lists below are derived here from the reference implementation's module structure
(score_sde_pytorch: models/ncsnpp.py, layerspp.py, layers.py, ddpm.py, up_or_down_sampling.py), written
independently of our `models/` code: for each module the reference appends to `all_modules`, its sub-modules
in the order its __init__ registers them. A synthetic checkpoint in the reference's format (DataParallel
names, `sigmas` buffer, EMA shadow list, Adam state) is built from these lists with random values.
"""
from __future__ import annotations

import glob
import math
import os
from collections import OrderedDict

import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import configs
import models
from errors import UserError
from models.embeddings import positional_timesteps
from sde_lib import get_sde
from training.checkpoint import checkpoint_path, load_checkpoint, restore_model
from training.convert import convert_checkpoint, reference_sigmas

# ----------------------------------------------------------------------------------------------------------
# Reference module structure (name, shape, trainable), in registration order


def _conv(prefix, cin, cout, k=3):
    return [(f"{prefix}weight", (cout, cin, k, k), True), (f"{prefix}bias", (cout,), True)]


def _linear(prefix, cin, cout):
    return [(f"{prefix}weight", (cout, cin), True), (f"{prefix}bias", (cout,), True)]


def _norm(prefix, c):
    return [(f"{prefix}weight", (c,), True), (f"{prefix}bias", (c,), True)]


def _nin(prefix, cin, cout):
    return [(f"{prefix}W", (cin, cout), True), (f"{prefix}b", (cout,), True)]


def _attn(p, c):
    return _norm(f"{p}GroupNorm_0.", c) + sum((_nin(f"{p}NIN_{i}.", c, c) for i in range(4)), [])


def _resblock(p, kind, cin, cout, temb, resample=False):
    """layerspp.ResnetBlockBigGANpp / ResnetBlockDDPMpp / layers.ResnetBlockDDPM: GN0, Conv_0, Dense_0, GN1,
    Conv_1, then the shortcut (Conv_2 1x1 for BigGAN when channels change or resampling, NIN_0 otherwise)."""
    out = _norm(f"{p}GroupNorm_0.", cin) + _conv(f"{p}Conv_0.", cin, cout) + _linear(f"{p}Dense_0.", temb, cout)
    out += _norm(f"{p}GroupNorm_1.", cout) + _conv(f"{p}Conv_1.", cout, cout)
    if kind == "biggan" and (cin != cout or resample):
        out += _conv(f"{p}Conv_2.", cin, cout, k=1)
    elif kind != "biggan" and cin != cout:
        out += _nin(f"{p}NIN_0.", cin, cout)
    return out


def reference_ncsnpp_params(m: dict, image_size: int, channels: int, continuous_fourier: bool):
    """Parameters of the reference NCSNpp (also DDPM++) for model settings `m`: list of modules, each a
    list of (name, shape, trainable) with names relative to all_modules.<i>."""
    nf, nrb, ch_mult = m["nf"], m["num_res_blocks"], m["ch_mult"]
    levels = len(ch_mult)
    res = [image_size // 2 ** i for i in range(levels)]
    mods = []
    if continuous_fourier:
        mods.append([("W", (nf,), False)])
        embed = 2 * nf
    else:
        embed = nf
    mods.append(_linear("", embed, 4 * nf))
    mods.append(_linear("", 4 * nf, 4 * nf))
    temb, kind, fir = 4 * nf, m["resblock_type"], m["fir"]
    conv_name = "Conv2d_0." if fir else "Conv_0."
    mods.append(_conv("", channels, nf))
    hs, cin, pyr = [nf], nf, channels
    for lvl in range(levels):
        for _ in range(nrb):
            cout = nf * ch_mult[lvl]
            mods.append(_resblock("", kind, cin, cout, temb))
            cin = cout
            if res[lvl] in m["attn_resolutions"]:
                mods.append(_attn("", cin))
            hs.append(cin)
        if lvl != levels - 1:
            if kind == "ddpm":
                mods.append(_conv(conv_name, cin, cin))  # Downsample with conv
            else:
                mods.append(_resblock("", kind, cin, cin, temb, resample=True))
            if m["progressive_input"] == "input_skip":
                mods.append([])  # pyramid Downsample without conv: no parameters
                mods.append(_conv("Conv.", pyr, cin, k=1))  # Combine
                if m["progressive_combine"] == "cat":
                    cin *= 2
            elif m["progressive_input"] == "residual":
                mods.append(_conv(conv_name, pyr, cin))
                pyr = cin
            hs.append(cin)
    cin = hs[-1]
    mods += [_resblock("", kind, cin, cin, temb), _attn("", cin), _resblock("", kind, cin, cin, temb)]
    pch = 0
    for lvl in reversed(range(levels)):
        for _ in range(nrb + 1):
            cout = nf * ch_mult[lvl]
            mods.append(_resblock("", kind, cin + hs.pop(), cout, temb))
            cin = cout
        if res[lvl] in m["attn_resolutions"]:
            mods.append(_attn("", cin))
        prog = m["progressive"]
        if prog != "none":
            if lvl == levels - 1:
                mods.append(_norm("", cin))
                pch = channels if prog == "output_skip" else cin
                mods.append(_conv("", cin, pch))
            elif prog == "output_skip":
                mods += [[], _norm("", cin), _conv("", cin, channels)]
                pch = channels
            else:
                mods.append(_conv(conv_name, pch, cin))
                pch = cin
        if lvl != 0:
            mods.append(_conv(conv_name, cin, cin) if kind == "ddpm" else
                        _resblock("", kind, cin, cin, temb, resample=True))
    if m["progressive"] != "output_skip":
        mods += [_norm("", cin), _conv("", cin, channels)]
    return mods


def reference_ddpm_params(m: dict, image_size: int, channels: int):
    """Parameters of the reference DDPM (models/ddpm.py): same skeleton, DDPM blocks, conv resampling."""
    return reference_ncsnpp_params(dict(m, resblock_type="ddpm", fir=False, progressive="none",
                                        progressive_input="none"), image_size, channels, False)


def flatten(mods):
    """[(full name, shape, trainable)] in registration order."""
    return [(f"all_modules.{i}.{name}", shape, tr) for i, mod in enumerate(mods) for name, shape, tr in mod]


# ----------------------------------------------------------------------------------------------------------
# Tiny configs (ours) and synthetic reference checkpoints

TINY_UNET = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)


def tiny_config(name: str, **model_overrides) -> ml_collections.ConfigDict:
    """A named ssde config shrunk to 8x8 images with a small network (same layer types and options)."""
    config = configs.get_config(name)
    config.data.image_size = 8
    small = dict(TINY_UNET, nf=32) if config.model.name == "ddpm" else dict(TINY_UNET)
    config.model.update(dict(small, **model_overrides))
    return config


def reference_params_for(config):
    m = config.model
    if m.name == "ddpm":
        return flatten(reference_ddpm_params(dict(m), config.data.image_size, config.data.num_channels))
    fourier = m.embedding_type == "fourier"
    return flatten(reference_ncsnpp_params(dict(m), config.data.image_size, config.data.num_channels, fourier))


def make_reference_checkpoint(config, seed: int = 0, with_sigmas: bool = True) -> dict:
    """A checkpoint as score_sde_pytorch saves it, with random values: model (DataParallel names), EMA
    shadow list of the trainable parameters in order, Adam state by parameter position, step."""
    g = torch.Generator().manual_seed(seed)
    params = reference_params_for(config)
    model = OrderedDict()
    if with_sigmas:  # the reference's top-level buffer comes before the children's tensors
        model["module.sigmas"] = torch.exp(torch.linspace(math.log(config.sde.sigma_max),
                                                          math.log(config.sde.sigma_min),
                                                          config.sde.num_scales, dtype=torch.float64))
    for name, shape, _ in params:
        model[f"module.{name}"] = 0.3 * torch.randn(shape, generator=g)
    shadow = [0.3 * torch.randn(shape, generator=g) for _, shape, tr in params if tr]
    state = {i: {"step": torch.tensor(77.0), "exp_avg": torch.randn(shape, generator=g),
                 "exp_avg_sq": torch.rand(shape, generator=g)} for i, (_, shape, tr) in enumerate(params) if tr}
    group = {"lr": 2e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0, "amsgrad": False,
             "params": list(range(len(params)))}
    return {"model": model, "ema": {"decay": 0.9999, "num_updates": 77, "shadow_params": shadow},
            "optimizer": {"state": state, "param_groups": [group]}, "step": 77}


def save(tmp_path, ckpt, name="src.pth") -> str:
    path = os.path.join(tmp_path, name)
    torch.save(ckpt, path)
    return path


VE_CONT = "ssde_ve_cifar10_ncsnpp_continuous"
VP_CONT = "ssde_vp_cifar10_ddpmpp_continuous"
VP_DDPM = "ssde_vp_cifar10_ddpm"


# ----------------------------------------------------------------------------------------------------------
# Structure: our networks have the reference's names and shapes


@pytest.mark.parametrize("name,overrides", [
    (VE_CONT, {}),
    (VP_CONT, {}),
    ("ssde_ve_cifar10_ncsnpp", {}),
    (VE_CONT, dict(progressive="output_skip", progressive_input="input_skip", progressive_combine="cat")),
    (VE_CONT, dict(progressive="residual", progressive_input="residual", resblock_type="ddpm")),
    (VP_DDPM, {}),
])
def test_reference_names_and_shapes_match_ours(name, overrides):
    config = tiny_config(name, **overrides)
    ref = reference_params_for(config)
    ours = [(n, tuple(p.shape), p.requires_grad) for n, p in models.create_model(config).named_parameters()]
    assert sorted(ref) == sorted(ours)
    assert not models.create_model(config).state_dict().keys() - {n for n, _, _ in ref}  # no persistent buffers


@pytest.mark.parametrize("name", [n for n in configs.available_configs() if n.startswith("ssde_")])
def test_full_size_published_networks_have_the_reference_tensors(name):
    """Every published CIFAR-10 network, at full size (built on the meta device: no memory, no time)."""
    config = configs.get_config(name)
    with torch.device("meta"):
        model = models.create_model(config)
    ours = [(n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()]
    assert sorted(ours) == sorted(reference_params_for(config))


@pytest.mark.parametrize("name", [VE_CONT, VP_CONT, VP_DDPM])
def test_parameter_order_is_the_reference_order(name):
    config = tiny_config(name)
    ours = [(n, tuple(p.shape), p.requires_grad) for n, p in models.create_model(config).named_parameters()]
    assert ours == reference_params_for(config)


# ----------------------------------------------------------------------------------------------------------
# Conversion: every tensor arrives at its place


def _convert(tmp_path, config, ckpt, name="cfg"):
    src = save(tmp_path, ckpt)
    workdir = os.path.join(tmp_path, "run")
    report = convert_checkpoint(src, config, workdir, config_name=name)
    return report, workdir


@pytest.mark.parametrize("name", [VE_CONT, VP_DDPM])
def test_every_tensor_arrives_at_its_place(tmp_path, name):
    config = tiny_config(name)
    ckpt = make_reference_checkpoint(config)
    report, workdir = _convert(tmp_path, config, ckpt, name)
    params = reference_params_for(config)
    trainable = [n for n, _, tr in params if tr]
    assert report.num_tensors == len(params) and report.num_shadow == len(trainable)
    assert report.checked_buffers == ["sigmas"] and report.step == 77

    ema_model, step = restore_model(config, workdir, "cpu", use_ema=True)
    raw_model, _ = restore_model(config, workdir, "cpu", use_ema=False)
    assert step == 77 and not ema_model.training
    ema_weights, raw_weights = dict(ema_model.named_parameters()), dict(raw_model.named_parameters())
    shadow = dict(zip(trainable, ckpt["ema"]["shadow_params"]))
    for n, _, tr in params:
        assert torch.equal(raw_weights[n], ckpt["model"][f"module.{n}"]), n
        # EMA weights for trained tensors; fixed ones (Fourier W) are the model's own
        expected = shadow[n] if tr else ckpt["model"][f"module.{n}"]
        assert torch.equal(ema_weights[n], expected), n

    # the EMA state and the Adam moments follow each tensor by name into our parameter order
    state = load_checkpoint(checkpoint_path(workdir))
    assert state["ema"]["decay"] == 0.9999 and state["ema"]["num_updates"] == 77
    assert state["converted_from"]["format"] == "score_sde_pytorch"
    ours = [n for n, _ in raw_model.named_parameters()]
    ref_index = {n: i for i, (n, _, _) in enumerate(params)}
    opt = torch.optim.AdamW(raw_model.parameters(), lr=1e-4)
    opt.load_state_dict(state["optimizer"])
    for i, n in enumerate(ours):
        if n in shadow:
            assert torch.equal(opt.state_dict()["state"][i]["exp_avg"],
                               ckpt["optimizer"]["state"][ref_index[n]]["exp_avg"]), n
    assert len(opt.state_dict()["state"]) == len(trainable)


def test_ema_maps_by_name_not_by_our_parameter_order(tmp_path):
    """The DDPM checkpoint's EMA list is in the reference's registration order; whatever order our network
    registers its parameters in, each shadow tensor must land on the parameter of the same name."""
    config = tiny_config(VP_DDPM)
    ckpt = make_reference_checkpoint(config, seed=3)
    _, workdir = _convert(tmp_path, config, ckpt)
    model, _ = restore_model(config, workdir, "cpu")
    trainable = [n for n, _, tr in reference_params_for(config) if tr]
    for n, s in zip(trainable, ckpt["ema"]["shadow_params"]):
        assert torch.equal(dict(model.named_parameters())[n], s), n


# ----------------------------------------------------------------------------------------------------------
# Forward pass: each block of the converted network equals the direct computation with the source tensors


def _gn(x, src, p):
    groups = min(x.shape[1] // 4, 32)
    return F.group_norm(x, groups, src[p + "weight"], src[p + "bias"], eps=1e-6)


def _nin_fwd(x, src, p):
    return torch.einsum("bchw,co->bohw", x, src[p + "W"]) + src[p + "b"][None, :, None, None]


def _direct_resblock(x, temb, src, p, ddpm_groups):
    gn = (lambda h, q: F.group_norm(h, 32, src[q + "weight"], src[q + "bias"], eps=1e-6)) if ddpm_groups else \
        (lambda h, q: _gn(h, src, q))
    h = F.conv2d(F.silu(gn(x, p + "GroupNorm_0.")), src[p + "Conv_0.weight"], src[p + "Conv_0.bias"], padding=1)
    h = h + F.linear(F.silu(temb), src[p + "Dense_0.weight"], src[p + "Dense_0.bias"])[:, :, None, None]
    h = F.conv2d(F.silu(gn(h, p + "GroupNorm_1.")), src[p + "Conv_1.weight"], src[p + "Conv_1.bias"], padding=1)
    if p + "Conv_2.weight" in src:
        x = F.conv2d(x, src[p + "Conv_2.weight"], src[p + "Conv_2.bias"])
    elif p + "NIN_0.W" in src:
        x = _nin_fwd(x, src, p + "NIN_0.")
    return x + h if ddpm_groups else (x + h) / math.sqrt(2.0)


def _direct_attn(x, src, p, ddpm_groups):
    b, c, hh, ww = x.shape
    h = F.group_norm(x, 32, src[p + "GroupNorm_0.weight"], src[p + "GroupNorm_0.bias"], eps=1e-6) \
        if ddpm_groups else _gn(x, src, p + "GroupNorm_0.")
    q, k, v = (_nin_fwd(h, src, f"{p}NIN_{i}.") for i in range(3))
    w = torch.einsum("bchw,bcij->bhwij", q, k).reshape(b, hh, ww, hh * ww) / math.sqrt(c)
    w = torch.softmax(w, dim=-1).reshape(b, hh, ww, hh, ww)
    h = _nin_fwd(torch.einsum("bhwij,bcij->bchw", w, v), src, p + "NIN_3.")
    return x + h if ddpm_groups else (x + h) / math.sqrt(2.0)


def _timestep_embedding(t, dim):
    """DDPM's sinusoidal embedding, as the reference's layers.get_timestep_embedding computes it."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


@pytest.mark.parametrize("name", [VE_CONT, VP_DDPM])
def test_blocks_compute_the_reference_function_with_the_source_tensors(tmp_path, name):
    torch.manual_seed(0)
    config = tiny_config(name)
    ckpt = make_reference_checkpoint(config, seed=1)
    _, workdir = _convert(tmp_path, config, ckpt)
    model, _ = restore_model(config, workdir, "cpu")
    params = reference_params_for(config)
    trainable = [n for n, _, tr in params if tr]
    src = {n: ckpt["model"][f"module.{n}"] for n, _, _ in params}
    src.update(zip(trainable, ckpt["ema"]["shadow_params"]))  # the EMA weights are the ones used
    ddpm = config.model.name == "ddpm"

    captured = {}

    def hook(i):
        def record(module, inputs, output):
            captured[i] = (inputs, output)
        return record

    for i, module in enumerate(model.all_modules):
        module.register_forward_hook(hook(i))
    x = torch.rand(2, 3, 8, 8)
    labels = torch.tensor([0.7, 12.0]) if not ddpm else torch.tensor([3.0, 998.0])
    with torch.no_grad():
        model(x, labels)

        # time embedding: Fourier features of log sigma (VE) or the sinusoid of the label, then two dense layers
        if ddpm:
            emb, first_dense = _timestep_embedding(labels, config.model.nf), 0
        else:
            proj = torch.log(labels)[:, None] * src["all_modules.0.W"][None] * 2 * np.pi
            emb, first_dense = torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1), 1
        d0, d1 = f"all_modules.{first_dense}.", f"all_modules.{first_dense + 1}."
        temb = F.linear(F.silu(F.linear(emb, src[d0 + "weight"], src[d0 + "bias"])), src[d1 + "weight"], src[d1 + "bias"])
        torch.testing.assert_close(captured[first_dense + 1][1], temb, rtol=1e-5, atol=1e-5)

        # input convolution (VE data in [0, 1] is mapped to [-1, 1] first)
        i = first_dense + 2
        h_in = x if config.data.centered else 2 * x - 1
        w = f"all_modules.{i}."
        torch.testing.assert_close(captured[i][1], F.conv2d(h_in, src[w + "weight"], src[w + "bias"], padding=1))

        checked = {"resblock": 0, "attn": 0}
        for i, module in enumerate(model.all_modules):
            inp, out = captured[i]
            p = f"all_modules.{i}."
            is_res = p + "Conv_1.weight" in src and not getattr(module, "up", False) and not getattr(module, "down", False)
            if is_res:
                direct = _direct_resblock(inp[0], inp[1], src, p, ddpm)
                checked["resblock"] += 1
            elif p + "NIN_3.W" in src:
                direct = _direct_attn(inp[0], src, p, ddpm)
                checked["attn"] += 1
            else:
                continue
            torch.testing.assert_close(out, direct, rtol=1e-4, atol=1e-5, msg=f"module {i}")
        assert checked["resblock"] >= 7 and checked["attn"] >= 3

        # output layers: GroupNorm, activation, convolution (VE: then divided by sigma)
        last = len(model.all_modules) - 1
        norm_in = captured[last - 1][0][0]
        gn = F.group_norm(norm_in, 32 if ddpm else min(norm_in.shape[1] // 4, 32),
                          src[f"all_modules.{last - 1}.weight"], src[f"all_modules.{last - 1}.bias"], eps=1e-6)
        out = F.conv2d(F.silu(gn), src[f"all_modules.{last}.weight"], src[f"all_modules.{last}.bias"], padding=1)
        if config.model.scale_by_sigma:
            out = out / labels[:, None, None, None]
        torch.testing.assert_close(model(x, labels), out, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# main.py runs on a converted checkpoint


def test_main_samples_and_computes_bits_per_dim_on_a_converted_checkpoint(tmp_path, capsys):
    import main

    digits = ["--config.data.dataset=digits", "--config.data.num_channels=1", "--config.data.image_size=8",
              "--config.model.nf=8", "--config.model.ch_mult=(1, 2)", "--config.model.num_res_blocks=1",
              "--config.model.attn_resolutions=(4,)", "--config.model.dropout=0.0"]
    config = configs.get_config(VE_CONT)
    configs.apply_overrides(config, [a[len("--config."):] for a in digits])
    src = save(tmp_path, make_reference_checkpoint(config, seed=2))
    workdir = os.path.join(tmp_path, "run")
    from scripts.convert_score_sde_checkpoint import main as convert_main
    assert convert_main([src, "--config", VE_CONT, "--out", workdir] + digits) == 0
    assert "wrote" in capsys.readouterr().out
    common = ["--config", VE_CONT, "--workdir", workdir] + digits
    assert main.main(["--mode", "sample", "--solver", "ode_euler", "--nfe", "3", "--num_samples", "2"] + common) == 0
    fast = ["--config.likelihood.rtol=1e-2", "--config.likelihood.atol=1e-2", "--config.likelihood.num_dequant=1",
            "--config.likelihood.batch_size=2", "--num_batches", "1", "--split", "train"]  # digits: one split
    assert main.main(["--mode", "likelihood"] + common + fast) == 0
    assert "bits/dim" in capsys.readouterr().out
    assert len(glob.glob(os.path.join(workdir, "likelihood", "likelihood_train_h*.json"))) == 1


# ----------------------------------------------------------------------------------------------------------
# Error paths: each names the problem


def _error(tmp_path, config, ckpt, name="cfg") -> str:
    with pytest.raises(UserError) as info:
        _convert(tmp_path, config, ckpt, name)
    return str(info.value)


def test_wrong_config_for_the_checkpoint(tmp_path):
    ve = tiny_config(VE_CONT)
    ckpt = make_reference_checkpoint(ve)
    message = _error(tmp_path, tiny_config(VP_CONT), ckpt, VP_CONT)
    assert "does not fit config " + VP_CONT in message and "all_modules.0.W" in message
    deep = _error(tmp_path, tiny_config(VE_CONT, num_res_blocks=2), ckpt, "deep")
    assert "missing" in deep or "no place" in deep
    other_sde = tiny_config(VE_CONT)
    other_sde.sde.sigma_max = 348.0
    assert "sigmas" in _error(tmp_path, other_sde, ckpt) and "348" in _error(tmp_path, other_sde, ckpt)


def test_missing_and_extra_keys(tmp_path):
    config = tiny_config(VE_CONT)
    ckpt = make_reference_checkpoint(config)
    gone = next(n for n, _, _ in reference_params_for(config) if n.endswith("NIN_2.W"))
    del ckpt["model"][f"module.{gone}"]
    assert gone in _error(tmp_path, config, ckpt)
    ckpt = make_reference_checkpoint(config)
    ckpt["model"]["module.all_modules.3.Conv_9.weight"] = torch.zeros(3)
    message = _error(tmp_path, config, ckpt)
    assert "all_modules.3.Conv_9.weight" in message and "no place" in message


def test_shape_mismatch_names_the_tensor(tmp_path):
    config = tiny_config(VE_CONT)
    ckpt = make_reference_checkpoint(config)
    ckpt["model"]["module.all_modules.4.Conv_0.weight"] = torch.zeros(8, 8, 1, 1)
    message = _error(tmp_path, config, ckpt)
    assert "all_modules.4.Conv_0.weight" in message and "(8, 8, 1, 1)" in message

    ckpt = make_reference_checkpoint(config)
    trainable = [n for n, _, tr in reference_params_for(config) if tr]
    k = trainable.index("all_modules.4.Conv_1.weight")
    ckpt["ema"]["shadow_params"][k] = torch.zeros(2, 2)
    assert "all_modules.4.Conv_1.weight" in _error(tmp_path, config, ckpt)

    ckpt = make_reference_checkpoint(config)
    ckpt["ema"]["shadow_params"].pop()
    assert "shadow tensors" in _error(tmp_path, config, ckpt)

    ckpt = make_reference_checkpoint(config)
    ckpt["model"]["module.all_modules.2.bias"][0] = float("nan")
    assert "all_modules.2.bias" in _error(tmp_path, config, ckpt)


def test_files_that_are_not_checkpoints(tmp_path):
    config = tiny_config(VE_CONT)
    junk = os.path.join(tmp_path, "junk.pth")
    with open(junk, "wb") as handle:
        handle.write(np.random.default_rng(0).bytes(4096))
    cases = {junk: "not a readable PyTorch checkpoint",
             save(tmp_path, {"foo": 1}, "foo.pth"): "missing model, ema, optimizer, step",
             save(tmp_path, [torch.zeros(2)], "list.pth"): "holds a list",
             save(tmp_path, make_reference_checkpoint(config)["model"], "bare.pth"): "bare state dict",
             os.path.join(tmp_path, "absent.pth"): "no checkpoint file"}
    for path, expected in cases.items():
        with pytest.raises(UserError, match=expected):
            convert_checkpoint(path, config, os.path.join(tmp_path, "out"))


def test_existing_checkpoint_is_not_overwritten_and_cli_reports_errors(tmp_path, capsys):
    from scripts.convert_score_sde_checkpoint import main as convert_main

    config = tiny_config(VE_CONT)
    _, workdir = _convert(tmp_path, config, make_reference_checkpoint(config))
    with pytest.raises(UserError, match="already exists"):
        convert_checkpoint(os.path.join(tmp_path, "src.pth"), config, workdir)
    assert convert_main([os.path.join(tmp_path, "src.pth"), "--config", "no_such_config", "--out", workdir]) == 2
    assert "unknown config" in capsys.readouterr().err


def test_reference_sigmas_table():
    config = configs.get_config(VE_CONT)
    sigmas = reference_sigmas(config)
    assert sigmas.shape == (1000,) and math.isclose(sigmas[0], 50.0) and math.isclose(sigmas[-1], 0.01)


# ----------------------------------------------------------------------------------------------------------
# Time conditioning of every named config: what get_score_fn feeds the network, as the reference does


class _Recorder(torch.nn.Module):
    """Stands in for the network: records its labels and returns ones."""

    def forward(self, x, labels):
        self.labels = labels.clone()
        return torch.ones_like(x)


def _reference_labels_and_scale(config, t):
    """(labels, score of a network output of ones) by the reference's get_score_fn (models/utils.py), in t's dtype
    for the labels as the reference computes them, the std tables in float64."""
    s = config.sde
    n = s.num_scales
    if s.name == "vesde":
        if config.training.continuous:  # labels = marginal std sigma(t)
            return s.sigma_min * (s.sigma_max / s.sigma_min) ** t.double(), torch.ones_like(t)
        # discrete: index round((T - t)(N - 1)) (torch.round: half to even) into the descending table
        # sigmas = exp(linspace(log sigma_max, log sigma_min, N)); the network divides by sigmas[index]
        labels = 1.0 - t
        labels *= n - 1
        index = torch.round(labels).long()
        table = torch.exp(torch.linspace(math.log(s.sigma_max), math.log(s.sigma_min), n, dtype=torch.float64))
        return table[index], torch.ones_like(t)
    if s.name == "vpsde" and not config.training.continuous:
        # DDPM: labels t (N - 1) (unrounded), std sqrt(1 - alphas_cumprod)[labels.long()] (truncation)
        labels = t * (n - 1)
        betas = torch.linspace(s.beta_min / n, s.beta_max / n, n, dtype=torch.float64)
        std = torch.sqrt(1 - torch.cumprod(1 - betas, 0))[labels.long()]
        return labels, -1 / std
    t64 = t.double()
    log_mean = -0.25 * t64 ** 2 * (s.beta_max - s.beta_min) - 0.5 * t64 * s.beta_min
    std = torch.sqrt(1 - torch.exp(2 * log_mean)) if s.name == "vpsde" else 1 - torch.exp(2 * log_mean)
    return 999 * t, -1 / std


def _conditioning_times(dtype):
    """10,000 uniform times (almost all off the step grid), the grid's ends, grid points, and times just
    below grid points and near the midpoints between them (where truncation and rounding pick other steps)."""
    uniform = torch.rand(10_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = torch.tensor([1.0, 10.0, 37.0, 100.0, 500.0, 998.0], dtype=torch.float64)
    grid = torch.cat([torch.tensor([1.0, 0.0, 0.3], dtype=torch.float64), steps / 999, (steps - 3e-5) / 999,
                      (steps + 0.5 - 3e-5) / 999, (steps + 0.5 + 3e-5) / 999])
    return torch.cat([uniform, grid]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", [n for n in configs.available_configs() if n.startswith("ssde_")])
def test_time_conditioning_matches_the_reference(name, dtype):
    config = configs.get_config(name)
    sde, net = get_sde(config), _Recorder()
    score_fn = models.get_score_fn(sde, net, continuous=config.training.continuous)
    t = _conditioning_times(dtype)
    x = torch.zeros(t.shape[0], 3, 1, 1, dtype=dtype)
    score = score_fn(x, t)
    labels, scale = _reference_labels_and_scale(config, t)
    if config.sde.name == "vesde" and not config.training.continuous:
        # our network gets sigma and maps it to the reference's index for its positional embedding: same level
        torch.testing.assert_close(net.labels.double(), labels, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
        index = positional_timesteps(net.labels, config)
        expected_index = torch.round((1 - t) * 999)
        assert torch.equal(torch.round(index), expected_index)
        # float32: sigma carries a relative rounding error <= 6e-8, and (N - 1) log(sigma_max / sigma) / log(5000)
        # turns it into <= 117 * 6e-8 ~ 1e-5 of index, plus the index's own rounding (2 ulp: 3e-7 relative),
        # as small as the reference's own float32 embedding error (index * frequency, 6e-8 relative)
        torch.testing.assert_close(index.double(), expected_index.double(), rtol=3e-7 if dtype == torch.float32
                                   else 1e-12, atol=2e-5 if dtype == torch.float32 else 1e-9)
    elif config.sde.name == "vpsde" and not config.training.continuous:
        assert torch.equal(net.labels, labels)  # the same float t (N - 1), computed in t's dtype
    else:
        torch.testing.assert_close(net.labels.double(), labels.double(), rtol=1e-6, atol=1e-6)
    # the score's scale: the reference's std in float64 (ours: float64 tables, or expm1 for the continuous
    # std, which is the more accurate near t = 0 where 1 - exp(-B) cancels: 1e-9 relative there)
    torch.testing.assert_close(score[:, 0, 0, 0].double(), scale.double(),
                               rtol=1e-6 if dtype == torch.float32 else 1e-9, atol=0)
