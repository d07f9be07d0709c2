"""benchmarks/gpu_check.sh: the one-call GPU check, exercised on CPU through --quick --device cpu (and the
GPU mode's command lines through a stand-in python); scripts/prepare_device_data.sh."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
PREPARE = os.path.join(ROOT, "scripts", "prepare_device_data.sh")
STEPS = ["env", "tests_gpu", "train", "sample", "likelihood", "tests_perf", "train_compile", "run", "run_bpd",
         "run_sample"]
# everything the check leaves in OUT: the device tool returns at most 8 files
OUT_FILES = {"steps.json", "train.json", "sample.json", "likelihood.json", "run.json", "run_samples.png",
             "summary.md", "gpu_check.log"}
DEVICE_TOOL_MAX_FILES = 8


def run_check(tmp_path, *args: str, python: str = sys.executable, timeout: float = 120):
    """Run gpu_check.sh with OUT in tmp_path; return (completed process, OUT)."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=python, TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=str(tmp_path))
    return proc, out


def load(path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_without_cuda_fails_fast_with_one_line(tmp_path):
    proc, out = run_check(tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--quick --device cpu" in lines[0]
    steps = load(out / "steps.json")["steps"]  # the reason is recorded too, as a failed env step
    assert [(s["name"], s["status"]) for s in steps] == [("env", "failed")] and "no CUDA device" in steps[0]["note"]


def test_a_torch_that_does_not_import_is_recorded(tmp_path):
    """It used to say "no CUDA device" (the ImportError went to /dev/null) and record nothing."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/bin/sh
case "$2" in *"import torch"*) echo "ImportError: libtorch_cpu.so: cannot open shared object file" >&2; exit 1 ;; esac
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    proc, out = run_check(tmp_path, python=str(fake))
    assert proc.returncode == 2 and "torch does not import" in proc.stderr and "libtorch_cpu.so" in proc.stderr
    steps = load(out / "steps.json")["steps"]
    assert steps[0]["status"] == "failed" and "libtorch_cpu.so" in steps[0]["note"]


def test_unknown_steps_and_earlier_results_are_refused(tmp_path):
    proc, out = run_check(tmp_path, "--quick", "--device", "cpu", "--steps", "trian")
    assert proc.returncode == 2 and "unknown step 'trian' in --steps" in proc.stderr
    out.mkdir(exist_ok=True)
    (out / "steps.json").write_text("{}")
    proc, _ = run_check(tmp_path, "--quick", "--device", "cpu", "--steps", "env")
    assert proc.returncode == 2 and "holds an earlier check's results" in proc.stderr and "--force" in proc.stderr
    assert (out / "steps.json").read_text() == "{}"


def test_bad_arguments_are_one_line(tmp_path):
    for args, message in [
            (["--quick", "--device", "cpu", "--nonsense"], "gpu_check: unknown argument '--nonsense' (use --quick, "
             "--device cuda|cpu, --data DIR, --budget SECONDS, --steps NAME,...)"),
            (["--cpu-dry-run", "--budget", "5m"], "gpu_check: --budget needs a whole number of seconds, got '5m'"),
            (["--quick", "--device", "tpu"], "gpu_check: --device must be cuda or cpu, got 'tpu'"),
            (["--quick", "--device"], "gpu_check: --device must be cuda or cpu, got ''"),
            (["--device", "cpu"], "gpu_check: --device cpu needs --quick (the full sizes would take hours on a CPU)"),
            (["--quick", "--device", "cpu", "--data", "no_such_folder"],
             f"gpu_check: --data '{tmp_path / 'no_such_folder'}' is not a folder (CIFAR-10 npz parts: "
             "scripts/prepare_device_data.sh)")]:
        proc, out = run_check(tmp_path, *args)
        assert proc.returncode == 2 and proc.stderr.strip() == message, (args, proc.stderr)
        assert not (out / "steps.json").exists()


def test_spent_budget_skips_every_step_and_still_reports(tmp_path):
    proc, out = run_check(tmp_path, "--quick", "--device", "cpu", "--budget", "0")
    assert proc.returncode == 0, proc.stderr
    report = load(out / "steps.json")
    assert report["mode"] == "quick-cpu" and report["all_ok"] is False
    assert [s["name"] for s in report["steps"]] == STEPS
    # the compiled rows are off by design in --quick; every other step found the budget spent
    assert all(s["status"] == ("off" if s["name"] == "train_compile" else "skipped") and s["result"] == ""
               for s in report["steps"])
    assert report["env"] == {}  # the env step did not run either
    assert "budget of 0 s spent" in (out / "summary.md").read_text()
    assert set(p.name for p in out.iterdir()) <= OUT_FILES


def test_failed_step_is_recorded_and_the_next_one_runs(tmp_path):
    # a python that fails the sampling benchmark (exit 3) and is the real interpreter otherwise
    wrapper = tmp_path / "python"
    wrapper.write_text('#!/usr/bin/env bash\ncase " $* " in *" --parts sample "*) echo "injected failure" >&2; '
                       f'exit 3 ;; esac\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sample.json").write_text("{}")  # a stale result must not pass for this run's
    # --cpu-dry-run: the old name of --quick --device cpu
    proc, out = run_check(tmp_path, "--cpu-dry-run", "--steps", "sample,tests_perf", python=str(wrapper))
    assert proc.returncode == 0, proc.stderr
    report = load(out / "steps.json")
    assert report["mode"] == "quick-cpu"
    sample, tests = report["steps"]
    assert (sample["name"], sample["status"], sample["rc"], sample["result"]) == ("sample", "failed", 3, "")
    assert sample["note"] == "injected failure"
    assert tests["name"] == "tests_perf" and tests["status"] == "ok" and "collected" in tests["note"]
    assert not (out / "sample.json").exists()
    assert "===== sample: failed (rc 3" in (out / "gpu_check.log").read_text()


def cifar_parts(folder, n_train: int = 16, n_test: int = 10, seed: int = 0) -> tuple[str, str]:
    """Tiny CIFAR-10-like npz parts (keys x uint8 (N,32,32,3), y uint8, names) as the shared data has them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n in (("train_0", n_train), ("test", n_test)):
        path = str(folder / f"{split}.npz")
        np.savez(path, x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y=rng.integers(0, 10, n).astype(np.uint8), names=np.array([f"img_{i}.png" for i in range(n)]))
        paths.append(path)
    return paths[0], paths[1]


def prepare(tmp_path, *args: str):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", PREPARE, *args], capture_output=True, text=True, env=env, timeout=60)


def test_prepare_device_data_copies_one_part_and_the_first_test_images(tmp_path):
    train, test = cifar_parts(tmp_path / "src")
    dest = tmp_path / "data" / "cifar10"
    proc = prepare(tmp_path, "--train", train, "--dest", str(dest), "--num_test", "4")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["test_4.npz", "train_0.npz"]
    assert (dest / "train_0.npz").read_bytes() == open(train, "rb").read()
    with np.load(test) as source, np.load(dest / "test_4.npz") as written:
        assert sorted(written.keys()) == ["x", "y"]
        for key in ("x", "y"):
            assert written[key].dtype == source[key].dtype and np.array_equal(written[key], source[key][:4])
    assert "MiB (limit 64 MiB per call)" in proc.stdout
    from data.cifar10 import load_cifar10

    assert load_cifar10(str(dest), "test")[0].shape == (4, 3, 32, 32)
    assert load_cifar10(str(dest), "train")[0].shape == (16, 3, 32, 32)
    # a second call with another --num_test replaces the first one's test part (both would be read)
    proc = prepare(tmp_path, "--train", train, "--dest", str(dest), "--num_test", "6")
    assert proc.returncode == 0 and "removed" in proc.stdout and "test_4.npz" in proc.stdout
    assert sorted(p.name for p in dest.iterdir()) == ["test_6.npz", "train_0.npz"]
    assert load_cifar10(str(dest), "test")[0].shape == (6, 3, 32, 32)
    for args, message in [(["--num_test", "0"], "prepare_device_data: --num_test needs a positive whole number, "
                                                "got '0'"),
                          (["--train", str(tmp_path / "none.npz")], f"prepare_device_data: --train "
                           f"'{tmp_path / 'none.npz'}' is not an npz file (CIFAR-10 part with keys x, y)")]:
        proc = prepare(tmp_path, "--train", train, "--dest", str(tmp_path / "other"), *args)
        assert proc.returncode == 2 and proc.stderr.strip() == message
        assert not (tmp_path / "other").exists()


def test_quick_cpu_run_steps_train_score_and_sample(tmp_path):
    """--quick --device cpu: the run steps on data from prepare_device_data.sh (seconds)."""
    train, _ = cifar_parts(tmp_path / "src")
    data = tmp_path / "data"
    assert prepare(tmp_path, "--train", train, "--dest", str(data), "--num_test", "4").returncode == 0
    proc, out = run_check(tmp_path, "--quick", "--device", "cpu", "--data", str(data),
                          "--steps", "run,run_bpd,run_sample")
    assert proc.returncode == 0, proc.stderr
    report = load(out / "steps.json")
    assert [s["name"] for s in report["steps"]] == ["run", "run_bpd", "run_sample"]
    assert report["all_ok"], report["steps"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["run.json", "run_samples.png", "steps.json", "summary.md", "gpu_check.log"])
    run = load(out / "run.json")
    assert run["data_path"] == str(data) and run["planned_iters"] == 3 and run["n_iters"] == 3
    assert run["train"]["step"] == 3 and run["train"]["steps_per_s"] > 0 and math.isfinite(run["train"]["loss"])
    lik = run["likelihood"]
    # the toolkit's default likelihood settings (vp_cifar keeps the paper's), one batch of the 4 test images
    import configs
    from configs.default import get_default_config

    default, own = get_default_config().likelihood, configs.get_config("vp_cifar").likelihood
    assert own.num_dequant != default.num_dequant  # vp_cifar keeps the paper's 5 dequantization passes
    changed = sorted(k for k in default.keys() if k in own and own[k] != default[k]
                     and k not in ("batch_size", "split", "num_batches", "toy_num_samples"))  # set by the step
    text = {k: str(default[k]).lower() if isinstance(default[k], bool) else str(default[k]) for k in changed}
    assert run["likelihood_overrides"].split() == [f"--config.likelihood.{k}={text[k]}" for k in changed]
    assert (lik["split"], lik["num_samples"], lik["error_norm"], lik["num_dequant"]) == (
        "test", 4, default.error_norm, default.num_dequant)
    assert lik["rtol"] == lik["atol"] == 1e-2 and lik["mean_nfe"] > 0 and lik["seconds"] > 0
    # a 3-step network is near its initialisation: bits/dim of uniform-noise images lie far above 0 and below
    # the 8 bits/dim of a uniform pixel model plus the prior's mismatch (measured 15.6)
    assert 1 < lik["bits_per_dim"] < 30
    sample = run["sample"]
    assert (sample["solver"], sample["nfe_used"], sample["num_samples"]) == ("em", 2, 4)
    assert run["grid"] == "run_samples.png" and (out / "run_samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "run bits/dim (test, 4 images" in summary and "run: 3 training steps" in summary


def test_gpu_mode_commands_fit_the_budget(tmp_path):
    """The full (CUDA) mode's command lines, through a python that claims CUDA and logs instead of running."""
    log = tmp_path / "calls.log"
    wrapper = tmp_path / "python"
    wrapper.write_text(f"""#!/usr/bin/env bash
case "$1" in
    -c) exit 0 ;;  # torch.cuda.is_available(), imports
    benchmarks/gpu_check_report.py) exec {sys.executable} "$@" ;;
esac
echo "$*" >>{log}
case " $* " in
    *" --parts train "*)  # eager bf16: 1600 images/s at batch 128 (12.5 steps/s); compiled: 2560
        compiled=false; rate=1600.0
        case " $* " in *" --compile on "*) compiled=true; rate=2560.0 ;; esac
        out="${{@: -1}}"
        printf '{{"training": [{{"batch": 128, "precision": "bf16", "compile": %s, "images_per_s": %s}}]}}' \
            "$compiled" "$rate" >"$out" ;;
esac
exit 0
""")
    wrapper.chmod(0o755)
    proc, out = run_check(tmp_path, "--budget", "300", python=str(wrapper))
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    train = [c for c in calls if "--parts train" in c]
    assert "--precisions bf16,float32 --compile off --batch_sizes 128" in train[0]
    assert "--device cuda" in train[0] and "--precisions bf16 --compile on --batch_sizes 128" in train[1]
    assert any("--parts sample --sample_batch 1024" in c for c in calls)
    assert any("--parts likelihood --likelihood_batch 64 --likelihood_tol 1e-5 --likelihood_scipy" in c
               for c in calls)
    (train_run,) = [c for c in calls if "--mode train" in c]
    report = load(out / "steps.json")
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == STEPS and report["mode"] == "gpu"
    # training fills the budget left after 200 s for bits/dim and sampling and 45 s of start-up: with 300 s
    # and (nearly) nothing spent, 55 s at 0.8 x 12.5 steps/s (the fallback without train.json is 8 steps/s)
    target = steps["run"]["timeout_s"] - 45
    assert 50 <= target <= 55
    assert f"--config.training.n_iters={10 * target} " in train_run + " "
    assert f"--config.training.snapshot_every={10 * target // 3} " in train_run
    assert "--device cuda" in train_run and "--config.data.path=.data/cifar10 " in train_run
    (bpd,) = [c for c in calls if "--mode likelihood" in c]
    # 500 test images in 5 saved batches: a timeout still leaves the batches done (run.json likelihood_partial)
    assert "--split test" in bpd and "--num_batches 5" in bpd and "--config.likelihood.batch_size=100" in bpd
    assert "--config.likelihood.num_dequant=1" in bpd
    (sample,) = [c for c in calls if "--mode sample" in c]
    assert "--num_samples 64" in sample
    assert steps["run_bpd"]["timeout_s"] <= 160 and steps["run_sample"]["timeout_s"] <= 60
    assert steps["train_compile"]["status"] == "ok" and steps["train_compile"]["result"] == "train.json"
    # the compiled row is appended to the eager one (the n_iters above come from the eager row)
    assert [(r["compile"], r["images_per_s"]) for r in load(out / "train.json")["training"]] == [
        (False, 1600.0), (True, 2560.0)]
    assert set(p.name for p in out.iterdir()) <= OUT_FILES


def test_out_files_fit_the_device_tool():
    assert len(OUT_FILES) <= DEVICE_TOOL_MAX_FILES
    header = open(SCRIPT, encoding="utf-8").read().split("set -u")[0]
    assert all(name in header for name in OUT_FILES) and "8 files" in header


@pytest.mark.slow
def test_quick_cpu_writes_every_result(tmp_path):
    proc, out = run_check(tmp_path, "--quick", "--device", "cpu", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(OUT_FILES)
    assert len(list(out.iterdir())) <= DEVICE_TOOL_MAX_FILES
    report = load(out / "steps.json")
    assert [s["name"] for s in report["steps"]] == STEPS
    assert report["all_ok"], report["steps"]
    assert all(0 < s["seconds"] <= s["timeout_s"] for s in report["steps"] if s["name"] != "train_compile")
    assert report["steps"][STEPS.index("train_compile")]["status"] == "off"
    env = report["env"]
    assert env["cuda_available"] is False and env["packages"]["torchsde"] and env["packages"]["ml_collections"]
    train = load(out / "train.json")
    assert {r["precision"] for r in train["training"]} == {"bf16", "float32"}
    assert all(r["images_per_s"] > 0 and 0 < r["mfu"] for r in train["training"])
    sampling = load(out / "sample.json")["sampling"]["vp_cifar"]["eager"]
    assert sampling["network"]["evals_per_s"] > 0
    lik = load(out / "likelihood.json")["likelihood"]["vp_cifar"]
    assert set(lik) == {"default", "dopri5_max_rms", "dopri5_rms", "scipy_rk45", "speedup_vs_scipy"}
    assert all(lik[m]["nfe"] > 0 for m in ("default", "dopri5_max_rms", "dopri5_rms", "scipy_rk45"))
    run = load(out / "run.json")
    assert run["train"]["step"] == 3 and run["likelihood"]["num_samples"] == 4 and run["sample"]["num_samples"] == 4
    summary = (out / "summary.md").read_text()
    assert "all steps ok" in summary and "images/s" in summary and "NFE" in summary
    assert f"torchsde {env['packages']['torchsde']}" in summary  # the environment, now inside steps.json, is still in the summary


def test_report_helpers_run_iters_and_append_training(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_report", os.path.join(ROOT, "benchmarks",
                                                                                   "gpu_check_report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)

    rows = [{"batch": 128, "precision": "float32", "compile": False, "images_per_s": 6400.0},
            {"batch": 128, "precision": "bf16", "compile": True, "images_per_s": 6400.0},
            {"batch": 128, "precision": "bf16", "compile": False, "images_per_s": float("nan")},
            {"batch": 512, "precision": "bf16", "compile": False, "images_per_s": 6400.0}]
    (tmp_path / "train.json").write_text(json.dumps({"training": rows}))
    # no usable eager bf16 row at batch 128: the fallback rate, 8 steps/s
    assert report.run_iters(str(tmp_path / "train.json"), 100) == 800
    rows.append({"batch": 128, "precision": "bf16", "compile": False, "images_per_s": 1280.0})
    (tmp_path / "train.json").write_text(json.dumps({"training": rows}))
    assert report.run_iters(str(tmp_path / "train.json"), 100) == 800  # 0.8 x 10 steps/s
    assert report.run_iters(str(tmp_path / "train.json"), 0.5) == 20  # at least 20 iterations
    assert report.run_iters(str(tmp_path / "missing.json"), 1e6) == 20000  # at most 20,000
    # the compiled rows go after the eager ones; without an eager report the compiled one becomes train.json
    (tmp_path / "compiled.json").write_text(json.dumps({"command": "c", "mfu_reference_flops": 2.0,
                                                         "training": [{"compile": True}]}))
    merged = report.append_training(str(tmp_path / "train.json"), str(tmp_path / "compiled.json"))
    assert merged["training"][-1] == {"compile": True} and len(merged["training"]) == len(rows) + 1
    assert merged["appended"] == [{"command": "c", "mfu_reference_flops": 2.0}]
    assert load(tmp_path / "train.json") == merged
    created = report.append_training(str(tmp_path / "new.json"), str(tmp_path / "compiled.json"))
    assert created["training"] == [{"compile": True}] and "appended" not in created
    with pytest.raises(SystemExit, match="no throughput report"):
        report.append_training(str(tmp_path / "train.json"), str(tmp_path / "none.json"))


def test_collect_run_reports_the_batches_a_stopped_likelihood_saved(tmp_path):
    """A run_bpd killed by its timeout leaves likelihood_*.json.partial: run.json and the summary report the
    batches done; once the final report exists, only it is reported."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_report", os.path.join(ROOT, "benchmarks",
                                                                                   "gpu_check_report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    workdir, out = tmp_path / "run", tmp_path / "out"
    (workdir / "likelihood").mkdir(parents=True)
    out.mkdir()
    journal = {"header": {"batches": [[0, 2], [2, 4], [4, 6]]},
               "batches": {"0": {"bpd": [3.0, 4.0], "nfe": 100.0, "seconds": 2.0},
                           "1": {"bpd": [5.0, 6.0], "nfe": 140.0, "seconds": 3.0}}}
    (workdir / "likelihood" / "likelihood_test_h1.json.partial").write_text(json.dumps(journal))
    run = report.collect_run(str(workdir), str(out))
    assert run["likelihood"] is None
    assert run["likelihood_partial"] == {"batches_done": 2, "batches": 3, "num_samples": 4, "bits_per_dim": 4.5,
                                         "mean_nfe": 120.0, "seconds": 5.0}
    assert any("stopped after 2 of 3 batches (4 images): 4.5000" in line for line in report.run_lines(run))
    (workdir / "likelihood" / "likelihood_test_h1.json.partial").write_text("{damaged")
    assert report.collect_run(str(workdir), str(out))["likelihood_partial"] is None
