"""The fast paths compute the same function as the plain ones (issue 6): bf16 autocast / torch.compile train
steps, the device-resident image pipeline, CUDA-graph score replay, and the throughput benchmark's smoke run.

Tolerances (measured on CPU, tiny DDPM++/NCSN++ with attention at 16x16, batch 8, one train step):
bf16 autocast changes the DSM loss by 1.3e-4 (VP) / 5.0e-4 (VE) relative and the gradient norm by 2.4e-3 /
6.0e-4 (bf16 keeps 8 mantissa bits: 2^-8 = 3.9e-3 per rounding, averaged over many terms); we allow 5e-3 for
the loss and 2e-2 for the gradient norm. torch.compile must agree with eager to 1e-4 relative.
"""
from __future__ import annotations

import math

import pytest
import torch

import configs
from data.loaders import ImageStream
from data.transforms import get_data_scaler
from errors import UserError
from sde_lib import VPSDE, batch_time, broadcast_to

# init_scale=1: the reference's init_scale=0 makes the output (near) zero at initialisation, and the loss of a
# first step would then not depend on the network's arithmetic at all
TINY_UNET = ["data.image_size=16", "model.nf=16", "model.ch_mult=(1, 2)", "model.num_res_blocks=1",
             "model.attn_resolutions=(16,)", "model.dropout=0.0", "model.init_scale=1.0"]


def tiny_config(name: str = "vp_cifar", batch: int = 8):
    config = configs.get_config(name)
    configs.apply_overrides(config, TINY_UNET)
    config.device = "cpu"
    config.training.batch_size = batch
    config.training.plot_samples = 0
    return config


def random_stream(config, batch: int, n: int = 64, device="cpu", keep_on_device=True) -> ImageStream:
    images = torch.randint(0, 256, (n, 3, config.data.image_size, config.data.image_size),
                           generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    return ImageStream(images, batch, int(config.seed), device=device, dequantize=True, flip=True,
                       scaler=get_data_scaler(config), keep_on_device=keep_on_device)


def one_step_loss(config, autocast_dtype=None):
    from training.trainer import new_train_step

    step = new_train_step(config, random_stream(config, int(config.training.batch_size)), torch.device("cpu"),
                          autocast_dtype=autocast_dtype)
    loss, grad_norm = step(0)
    return step, float(loss), float(grad_norm)


@pytest.mark.parametrize("name", ["vp_cifar", "ve_cifar"])
def test_bf16_autocast_step_matches_float32(name):
    config = tiny_config(name)
    _, loss32, grad32 = one_step_loss(config)
    step16, loss16, grad16 = one_step_loss(config, torch.bfloat16)
    assert math.isfinite(loss16) and math.isfinite(grad16)
    assert abs(loss16 - loss32) / abs(loss32) < 5e-3, (loss16, loss32)
    assert abs(grad16 - grad32) / abs(grad32) < 2e-2, (grad16, grad32)
    # float32 master weights, optimizer state and EMA under bf16 autocast
    assert all(p.dtype == torch.float32 for p in step16.state.model.parameters())
    assert all(s.dtype == torch.float32 for s in step16.state.ema.shadow_params)
    exp_avg = [v["exp_avg"] for v in step16.state.optimizer.state.values()]
    assert exp_avg and all(e.dtype == torch.float32 for e in exp_avg)


def test_bf16_autocast_really_runs_in_bf16():
    """The tolerance test above would pass trivially if autocast were ignored: the losses must differ."""
    config = tiny_config("vp_cifar")
    _, loss32, _ = one_step_loss(config)
    _, loss16, _ = one_step_loss(config, torch.bfloat16)
    assert loss16 != loss32


@pytest.mark.slow
def test_compiled_step_matches_eager():
    config = tiny_config("vp_cifar")
    _, eager, _ = one_step_loss(config)
    config.training.compile = True
    _, compiled, _ = one_step_loss(config)
    assert abs(compiled - eager) / abs(eager) < 1e-4, (compiled, eager)


def test_device_stream_equals_host_stream_and_has_the_right_distribution():
    config = tiny_config("vp_cifar")
    config.data.centered = True
    batch, n = 32, 48  # batches straddle epochs
    on_device = random_stream(config, batch, n=n, keep_on_device=True)
    on_host = random_stream(config, batch, n=n, keep_on_device=False)
    flips, total, u_values = 0, 0, []
    for step in range(6):
        x = on_device.batch(step)
        torch.testing.assert_close(x, on_host.batch(step), rtol=0, atol=0)
        idx = on_device.indices(step)
        assert idx.shape == (batch,) and int(idx.min()) >= 0 and int(idx.max()) < n
        pixels = on_device.images[idx].float()
        assert float(x.min()) >= -1.0 and float(x.max()) < 1.0  # centered: (k + u) / 256 * 2 - 1 in [-1, 1)
        unit = (x + 1) / 2 * 256  # = k + u for the kept orientation
        for image, k in zip(unit, pixels):
            plain, flipped = image - k, image - k.flip(-1)
            ok_plain = bool(((plain >= -1e-4) & (plain < 1 + 1e-4)).all())
            ok_flip = bool(((flipped >= -1e-4) & (flipped < 1 + 1e-4)).all())
            assert ok_plain or ok_flip, "each image is its pixels (or their mirror image) plus U[0, 1) noise"
            if not ok_plain:
                flips += 1
                u_values.append(flipped.reshape(-1))
            else:
                u_values.append(plain.reshape(-1))
            total += 1
    # flips: Binomial(192, 1/2) lies within 4 standard deviations (sd = 6.9) of 96
    assert abs(flips - total / 2) < 4 * math.sqrt(total / 4), (flips, total)
    u = torch.cat(u_values)
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005  # U[0, 1)
    # one epoch visits every image once: the first n positions are a permutation
    seen = torch.cat([on_device.indices(s) for s in range(3)])[:n]
    assert sorted(seen.tolist()) == list(range(n))


def gaussian_score(sde):
    def score(x, t):
        t = batch_time(t, x)
        var = sde.mean_coeff(t) ** 2 * 0.25 + sde.marginal_std(t) ** 2
        return -x / broadcast_to(var, x)
    return score


@pytest.mark.parametrize("solver", ["em", "ode_euler"])
def test_cuda_graph_option_is_a_plain_call_on_cpu(solver):
    import solvers
    from solvers.accel import CudaGraphScore

    sde = VPSDE(N=20)
    shape = (16, 2)
    plain, n1 = solvers.sample(sde, gaussian_score(sde), shape, solver=solver, nfe=10,
                               generator=torch.Generator().manual_seed(0))
    graphed, n2 = solvers.sample(sde, gaussian_score(sde), shape, solver=solver, nfe=10,
                                 generator=torch.Generator().manual_seed(0), cuda_graph=True)
    assert n1 == n2 == 10
    torch.testing.assert_close(graphed, plain, rtol=0, atol=0)
    wrapped = CudaGraphScore(gaussian_score(sde))
    x = torch.randn(shape)
    torch.testing.assert_close(wrapped(x, 0.3), gaussian_score(sde)(x, torch.full((16,), 0.3)))
    assert wrapped.replays == 0 and not wrapped.graphs


@pytest.mark.gpu
@pytest.mark.parametrize("solver", ["em", "ode_euler", "ode_rk4"])
def test_cuda_graph_sampler_equals_plain_sampler(solver):
    import models
    import solvers

    config = tiny_config("vp_cifar")
    device = torch.device("cuda")
    model = models.create_model(config).to(device).eval()
    sde = VPSDE(N=20)
    score_fn = models.get_score_fn(sde, model, continuous=True)
    shape = (8, 3, 16, 16)
    with torch.no_grad():
        plain, _ = solvers.sample(sde, score_fn, shape, solver=solver, nfe=12,
                                  generator=torch.Generator(device).manual_seed(0))
        graphed, _ = solvers.sample(sde, score_fn, shape, solver=solver, nfe=12,
                                    generator=torch.Generator(device).manual_seed(0), cuda_graph=True)
    torch.testing.assert_close(graphed, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_training_step_bf16_matches_float32():
    from training.trainer import new_train_step

    config = tiny_config("vp_cifar")
    device = torch.device("cuda")
    losses = []
    for dtype in (None, torch.bfloat16):
        step = new_train_step(config, random_stream(config, 8, device=device), device, autocast_dtype=dtype)
        losses.append(float(step(0)[0]))
    assert abs(losses[1] - losses[0]) / abs(losses[0]) < 5e-3


def test_throughput_benchmark_quick_smoke(tmp_path):
    from benchmarks import throughput

    out = tmp_path / "tp.json"
    args = throughput.parse_args(["--quick", "--device", "cpu", "--configs", "vp_cifar", "--precisions", "float32",
                                  "--batch_sizes", "2", "--steps", "1", "--warmup", "0", "--sample_batch", "2",
                                  "--sample_nfe", "2", "--likelihood_batch", "1", "--likelihood_tol", "1e-3",
                                  "--matmul_size", "64", "--out", str(out)] + [f"--config.{o}" for o in TINY_UNET])
    threads = torch.get_num_threads()
    try:
        report = throughput.run(args)
        assert torch.get_num_threads() == 1 and "1 threads" in report["device"]  # the CPU default
    finally:
        torch.set_num_threads(threads)
    row = report["training"][0]
    assert row["images_per_s"] > 0 and math.isfinite(row["loss"])
    flops = report["flops_per_image"]["vp_cifar"]
    # a train step costs a forward and a backward (about twice the forward): 2x to 4x the forward FLOPs
    assert 2.0 < flops["train_step"] / flops["forward"] < 4.0, flops
    assert 0 < row["mfu"] < 1.0
    sampling = report["sampling"]["vp_cifar"]["eager"]
    assert sampling["em"]["nfe"] == sampling["ode_euler"]["nfe"] == 2
    assert report["likelihood"]["vp_cifar"]["default"]["images_per_s"] > 0
    assert "| vp_cifar | 2 | float32 |" in throughput.format_table(report)


# --- scale-out: sampling and likelihood share their batches among processes and gather the results ---------

def _sharding_job(config):
    from data import toy_mixture
    from evaluation.likelihood_runner import evaluate
    from evaluation.sample_runner import generate
    from sde_lib import get_sde

    sde = get_sde(config)
    score_fn = toy_mixture(str(config.data.dataset)).score_fn(sde)
    samples, nfes = generate(config, sde, score_fn, "em", 20, 50, 5, torch.device("cpu"), progress=False)
    report = evaluate(config, sde, score_fn, "test", 3, torch.device("cpu"), progress=False)
    return {"samples": samples, "nfes": nfes, "nats": report["nats_per_dim"], "exact": report["exact_nats_per_dim"],
            "n": report["num_samples"]}


def _sharding_config():
    config = configs.get_config("vp_toy")
    config.sampling.batch_size = 16  # 50 samples: 4 batches (16, 16, 16, 2)
    config.likelihood.update(batch_size=8, divergence="exact", rtol=1e-3, atol=1e-3)  # 3 batches of 8
    return config


def _sharding_worker(rank: int, world_size: int, port: int, out: str) -> None:
    import os

    from training import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = distributed.setup(torch.device("cpu"))
    try:
        result = _sharding_job(_sharding_config())
    finally:
        distributed.cleanup(info)
    torch.save(result, os.path.join(out, f"{rank}.pt"))


def test_sampling_and_likelihood_shard_over_two_gloo_processes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sharding_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = _sharding_job(_sharding_config())
    for rank in (0, 1):
        shared = torch.load(tmp_path / f"{rank}.pt")
        # every process ends with all samples, identical to a single process's (each batch is seeded on its own)
        torch.testing.assert_close(shared["samples"], single["samples"], rtol=0, atol=0)
        assert shared["nfes"] == single["nfes"] == [20] * 4
        assert shared["n"] == single["n"] == 24
        assert shared["nats"] == pytest.approx(single["nats"], abs=1e-12)
        assert shared["exact"] == pytest.approx(single["exact"], abs=1e-12)
    assert abs(single["nats"] - single["exact"]) < 0.05  # and it is the right number (exact score, rtol 1e-3)


def test_sampling_config_accel_keys_are_plain_calls_on_cpu():
    """`sampling.cuda_graph=true` (and the wrapper it installs) leaves CPU samples bit-identical."""
    from data import toy_mixture
    from evaluation.sample_runner import generate
    from sde_lib import get_sde

    config = _sharding_config()
    sde = get_sde(config)
    score_fn = toy_mixture(str(config.data.dataset)).score_fn(sde)
    plain, _ = generate(config, sde, score_fn, "ode_euler", 10, 20, 3, torch.device("cpu"), progress=False)
    config.sampling.cuda_graph = True
    graphed, _ = generate(config, sde, score_fn, "ode_euler", 10, 20, 3, torch.device("cpu"), progress=False)
    torch.testing.assert_close(graphed, plain, rtol=0, atol=0)


@pytest.mark.parametrize("argv,message", [
    (["--precisions", "fp16"], "--precisions takes comma-separated names of float32, bf16"),
    (["--parts", "nosuch"], "--parts takes"), (["--device", "cud"], "--device must be"),
    (["--steps", "0"], "--steps must be a positive integer"), (["--batch_sizes", "abc"], "--batch_sizes takes"),
    (["--sample_nfe", "0"], "--sample_nfe must be")])
def test_throughput_refuses_bad_arguments_before_measuring(argv, message):
    """fp16 used to run float32 and be recorded as "fp16"; unknown parts wrote an empty report; the others
    ended in tracebacks."""
    from benchmarks import throughput

    with pytest.raises(UserError, match=message):
        throughput.check_args(throughput.parse_args(["--quick", *argv]))


def test_throughput_never_replaces_a_report(tmp_path):
    from benchmarks import throughput

    out = tmp_path / "report.json"
    out.write_text("{}")
    with pytest.raises(UserError, match="report.json exists"):
        throughput.check_args(throughput.parse_args(["--quick", "--out", str(out)]))
    args = throughput.parse_args(["--quick"])
    throughput.check_args(args)
    assert args.out.startswith("throughput_") and args.out.endswith("Z.json")
