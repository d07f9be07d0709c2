"""benchmarks/gpu_check.sh: the one-call GPU check, exercised on CPU through --cpu-dry-run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
STEPS = ["env", "tests_gpu", "train", "sample", "likelihood", "tests_perf"]


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
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--cpu-dry-run" in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_unknown_argument_is_one_line(tmp_path):
    proc, _ = run_check(tmp_path, "--cpu-dry-run", "--nonsense")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "gpu_check: unknown argument '--nonsense' (use --cpu-dry-run, --budget SECONDS, --steps NAME,...)")
    proc, _ = run_check(tmp_path, "--cpu-dry-run", "--budget", "5m")
    assert proc.returncode == 2 and proc.stderr.strip() == "gpu_check: --budget needs a whole number of seconds, got '5m'"


def test_spent_budget_skips_every_step_and_still_reports(tmp_path):
    proc, out = run_check(tmp_path, "--cpu-dry-run", "--budget", "0")
    assert proc.returncode == 0, proc.stderr
    report = load(out / "steps.json")
    assert report["mode"] == "cpu-dry-run" and report["all_ok"] is False
    assert [s["name"] for s in report["steps"]] == STEPS
    assert all(s["status"] == "skipped" and s["result"] == "" for s in report["steps"])
    assert "budget of 0 s spent" in (out / "summary.md").read_text()


def test_failed_step_is_recorded_and_the_next_one_runs(tmp_path):
    # a python that fails the sampling benchmark (exit 3) and is the real interpreter otherwise
    wrapper = tmp_path / "python"
    wrapper.write_text('#!/usr/bin/env bash\ncase " $* " in *" --parts sample "*) echo "injected failure" >&2; '
                       f'exit 3 ;; esac\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sample.json").write_text("{}")  # a stale result must not pass for this run's
    proc, out = run_check(tmp_path, "--cpu-dry-run", "--steps", "sample,tests_perf", python=str(wrapper))
    assert proc.returncode == 0, proc.stderr
    report = load(out / "steps.json")
    sample, tests = report["steps"]
    assert (sample["name"], sample["status"], sample["rc"], sample["result"]) == ("sample", "failed", 3, "")
    assert sample["note"] == "injected failure"
    assert tests["name"] == "tests_perf" and tests["status"] == "ok" and "collected" in tests["note"]
    assert not (out / "sample.json").exists()
    assert "===== sample: failed (rc 3" in (out / "gpu_check.log").read_text()


@pytest.mark.slow
def test_cpu_dry_run_writes_every_result(tmp_path):
    proc, out = run_check(tmp_path, "--cpu-dry-run", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["env.json", "train.json", "sample.json", "likelihood.json", "steps.json", "summary.md", "gpu_check.log"])
    report = load(out / "steps.json")
    assert [s["name"] for s in report["steps"]] == STEPS
    assert report["all_ok"], report["steps"]
    assert all(0 < s["seconds"] <= s["timeout_s"] for s in report["steps"])
    env = load(out / "env.json")
    assert env["cuda_available"] is False and env["packages"]["torchsde"] and env["packages"]["ml_collections"]
    train = load(out / "train.json")
    assert {r["precision"] for r in train["training"]} == {"bf16", "float32"}
    assert all(r["images_per_s"] > 0 and 0 < r["mfu"] for r in train["training"])
    sampling = load(out / "sample.json")["sampling"]["vp_cifar"]["eager"]
    assert sampling["network"]["evals_per_s"] > 0
    lik = load(out / "likelihood.json")["likelihood"]["vp_cifar"]
    assert set(lik) == {"default", "dopri5_max_rms", "dopri5_rms", "scipy_rk45", "speedup_vs_scipy"}
    assert all(lik[m]["nfe"] > 0 for m in ("default", "dopri5_max_rms", "dopri5_rms", "scipy_rk45"))
    summary = (out / "summary.md").read_text()
    assert "all steps ok" in summary and "images/s" in summary and "NFE" in summary
