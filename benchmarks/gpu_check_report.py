"""The GPU check's records: the machine (`env`), the short training run (`run_iters`, `likelihood_defaults`,
`collect_run`), the compiled training rows (`append_training`) and the summary of every step (`summary`).

Called by `benchmarks/gpu_check.sh`; only `env` imports torch (and `likelihood_defaults` the configs), so a
broken torch install still gets its failure recorded.

    python benchmarks/gpu_check_report.py env --out WORK/env.json
    python benchmarks/gpu_check_report.py summary --work WORK --out OUT      # OUT/steps.json (env folded in) ...
    python benchmarks/gpu_check_report.py append_training --into OUT/train.json --add WORK/train_compile.json
    python benchmarks/gpu_check_report.py run_iters --train_json OUT/train.json --seconds 120
    python benchmarks/gpu_check_report.py likelihood_defaults --config vp_cifar
    python benchmarks/gpu_check_report.py collect_run --workdir WORK/run --out OUT
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from atomic_io import atomic_write, write_json, write_text  # noqa: E402

STEPS_FILE = "steps.tsv"  # one line per finished step, appended by gpu_check.sh
STEP_FIELDS = ("name", "status", "rc", "seconds", "timeout_s", "result", "note")
ENV_FILE = "env.json"  # written to the work folder by `env`, folded into OUT/steps.json as "env"
RUN_FILE = "run.json"  # the short training run: training, bits/dim and sampling records
RUN_GRID = "run_samples.png"  # its sample grid, copied to OUT
OK_STATUSES = ("ok", "off")  # "off": a step the chosen mode leaves out on purpose (compile in --quick)


def _mfu_reference(report: dict) -> str:
    """What the MFU of a throughput report is measured against: its dense matmul rate (bf16 on a GPU; on a CPU
    the faster of bf16 and float32, which throughput.py takes as the ceiling)."""
    reference = report.get("mfu_reference_flops", report.get("bf16_matmul_flops", 0.0))
    kind = "bf16" if reference == report.get("bf16_matmul_flops") else "float32"
    return f"{kind} matmul {reference / 1e12:.3g} TFLOP/s"

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _version(module: str) -> str | None:
    try:
        return getattr(__import__(module), "__version__", "installed")
    except Exception as error:  # noqa: BLE001 - any import failure is what we record
        return None if isinstance(error, ImportError) else f"import failed: {type(error).__name__}"


def collect_env() -> dict:
    """The machine, the GPU (torch and nvidia-smi) and the versions of the packages the toolkit needs."""
    import torch

    env = {"date": _now(), "host": platform.node(), "python": platform.python_version(),
           "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
           "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "packages": {m: _version(m) for m in ("torchsde", "torchdiffeq", "ml_collections", "scipy", "numpy",
                                                  "tensorboard", "tqdm", "pytest")}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   gpu_memory_gib=props.total_memory / 2 ** 30, multiprocessors=props.multi_processor_count,
                   device_count=torch.cuda.device_count())
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = (smi.stdout or smi.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        env["nvidia_smi"] = f"not available: {error}"
    return env


def read_steps(work: str) -> list[dict]:
    """The step records appended by gpu_check.sh (tab-separated, one per line)."""
    path = os.path.join(work, STEPS_FILE)
    if not os.path.exists(path):
        return []
    steps = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            values = line.rstrip("\n").split("\t")
            record = dict(zip(STEP_FIELDS, values + [""] * (len(STEP_FIELDS) - len(values))))
            record["rc"] = int(record["rc"])
            record["seconds"] = float(record["seconds"])
            record["timeout_s"] = int(record["timeout_s"])
            steps.append(record)
    return steps


def _load(out: str, name: str) -> dict | None:
    path = os.path.join(out, name)
    if not name or not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _fmt(value: float, spec: str) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def key_numbers(out: str, steps: list[dict]) -> list[str]:
    """One Markdown line per headline number found in the steps' result files."""
    lines, seen = [], set()
    for step in steps:
        if step["name"].startswith("tests"):
            lines.append(f"- {step['name']}: {step['note'] or step['status']}")
        report = None if step["result"] in seen else _load(out, step["result"])
        seen.add(step["result"])
        if not report:
            continue
        for row in report.get("training", []):
            lines.append(f"- train {row['config']} batch {row['batch']} {row['precision']}"
                         f"{' compile' if row['compile'] else ''}: {_fmt(row['images_per_s'], '.1f')} images/s, "
                         f"MFU {_fmt(row['mfu'] * 100, '.1f')} % (of {_mfu_reference(report)})")
        for name, variants in report.get("sampling", {}).items():
            for label, r in variants.items():
                lines.append(f"- sample {name} {label} (batch {report['sampling_settings']['batch']}): network "
                             f"{r['network']['evals_per_s']:.1f} evals/s, EM overhead {r['em']['overhead']:+.1%}, "
                             f"PF-ODE overhead {r['ode_euler']['overhead']:+.1%}")
        for name, methods in report.get("likelihood", {}).items():
            for label, r in methods.items():
                if label != "speedup_vs_scipy":
                    lines.append(f"- likelihood {name} {label} (batch {report['likelihood_settings']['batch']}): "
                                 f"NFE {r['nfe']}, {r['seconds']:.2f} s, {r['images_per_s']:.2f} images/s, "
                                 f"{r['bpd']:.4f} bits/dim")
            for label, ratio in methods.get("speedup_vs_scipy", {}).items():
                lines.append(f"- likelihood {name} {label} vs scipy RK45: {ratio:.2f}x")
    return lines + run_lines(_load(out, RUN_FILE))


def run_lines(run: dict | None) -> list[str]:
    """The Markdown lines of the short training run (run.json)."""
    if not run:
        return []
    lines = []
    train = run.get("train")
    if train:
        lines.append(f"- run: {train['step']} training steps of {run['config']} (batch {run['batch_size']}, "
                     f"planned {run.get('planned_iters')}) in {train['seconds']:.1f} s, "
                     f"{train['steps_per_s']:.2f} steps/s, final loss {train['loss']:.4g}")
    lik = run.get("likelihood")
    if lik:
        lines.append(f"- run bits/dim ({lik['split']}, {lik['num_samples']} images, {lik['method']} "
                     f"{lik['error_norm']} rtol {lik['rtol']:g}): {lik['bits_per_dim']:.4f} "
                     f"± {lik['bits_per_dim_stderr']:.4f}, NFE {lik['mean_nfe']:.1f} per pass, "
                     f"{lik['seconds']:.1f} s, {lik['images_per_s']:.2f} images/s")
    partial = run.get("likelihood_partial")
    if partial and not lik:
        lines.append(f"- run bits/dim stopped after {partial['batches_done']} of {partial['batches']} batches "
                     f"({partial['num_samples']} images): {partial['bits_per_dim']:.4f}, NFE "
                     f"{partial['mean_nfe']:.1f} per pass, {partial['seconds']:.1f} s")
    sample = run.get("sample")
    if sample:
        lines.append(f"- run samples: {sample['num_samples']} with {sample['solver']} at NFE {sample['nfe_used']} "
                     f"in {sample['seconds']:.2f} s ({sample['samples_per_second']:.1f} samples/s); grid "
                     f"{run.get('grid') or 'none'}")
    return lines


def summarize(work: str, out: str, mode: str, total_s: float) -> dict:
    """Write OUT/steps.json, OUT/summary.md and OUT/gpu_check.log from the work folder; return the report."""
    steps = read_steps(work)
    env = _load(work, ENV_FILE) or {}
    report = {"date": _now(), "mode": mode, "gpu": env.get("gpu"), "torch": env.get("torch"),
              "total_seconds": total_s, "all_ok": bool(steps) and all(s["status"] in OK_STATUSES for s in steps),
              "steps": steps, "env": env}
    write_json(os.path.join(out, "steps.json"), report, indent=1)
    lines = [f"# GPU check ({mode}), {report['date']}", "",
             f"device: {env.get('gpu') or 'CPU'}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}, cuDNN "
             f"{env.get('cudnn')}); python {env.get('python')}; host {env.get('host')}; "
             f"nvidia-smi: {env.get('nvidia_smi', '-')}",
             "packages: " + ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items()),
             f"total {total_s:.0f} s; {'all steps ok' if report['all_ok'] else 'SOME STEPS FAILED OR SKIPPED'}", "",
             "| step | status | rc | seconds | timeout (s) | result | note |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['rc']} | {s['seconds']:.1f} | {s['timeout_s']} | "
              f"{s['result'] or '-'} | {s['note'] or ''} |" for s in steps]
    lines += ["", "Key numbers:", ""] + (key_numbers(out, steps) or ["- none"])
    write_text(os.path.join(out, "summary.md"), "\n".join(lines) + "\n")
    logs = []
    for step in steps:
        path = os.path.join(work, f"{step['name']}.log")
        text = open(path, encoding="utf-8", errors="replace").read() if os.path.exists(path) else ""
        logs.append(f"===== {step['name']}: {step['status']} (rc {step['rc']}, {step['seconds']:.1f} s)\n{text}")
    write_text(os.path.join(out, "gpu_check.log"), "\n".join(logs))
    return report


def append_training(into: str, add: str) -> dict:
    """Append the training rows of throughput report `add` to report `into` (created from `add` if missing)."""
    extra = _load(os.path.dirname(add) or ".", os.path.basename(add))
    if extra is None:
        raise SystemExit(f"gpu_check_report: no throughput report at {add}")
    base = _load(os.path.dirname(into) or ".", os.path.basename(into))
    if base is None:
        base = extra
    else:
        # each row keeps the MFU against its own run's matmul rate; the commands of both runs are kept
        base["training"] = base.get("training", []) + extra.get("training", [])
        base.setdefault("appended", []).append({"command": extra.get("command"),
                                                "mfu_reference_flops": extra.get("mfu_reference_flops")})
    write_json(into, base, indent=1)
    return base


def run_iters(train_json: str, seconds: float, batch: int = 128, fallback_steps_per_s: float = 8.0,
              efficiency: float = 0.8, lo: int = 20, hi: int = 20000) -> int:
    """Training iterations that fill about `seconds`, from the eager bf16 rate at `batch` in train.json."""
    report = _load(os.path.dirname(train_json) or ".", os.path.basename(train_json)) or {}
    rates = [row["images_per_s"] / row["batch"] for row in report.get("training", [])
             if row.get("precision") == "bf16" and not row.get("compile") and row.get("batch") == batch
             and isinstance(row.get("images_per_s"), (int, float)) and row["images_per_s"] > 0]
    steps_per_s = efficiency * rates[0] if rates else fallback_steps_per_s  # the loop adds EMA, logging
    return int(min(hi, max(lo, steps_per_s * seconds)))


def likelihood_defaults(config_name: str) -> list[str]:
    """`--config.likelihood.KEY=VALUE` for the toolkit's default likelihood settings that `config_name` changes."""
    import configs
    from configs.default import get_default_config

    default, config = get_default_config().likelihood, configs.get_config(config_name).likelihood
    keep = {"batch_size", "split", "num_batches", "toy_num_samples"}  # set by the run step itself
    overrides = []
    for key in sorted(default.keys()):
        if key in keep or key not in config or config[key] == default[key]:
            continue
        value = default[key]
        text = str(value).lower() if isinstance(value, bool) else str(value)
        overrides.append(f"--config.likelihood.{key}={text}")
    return overrides


def _latest(pattern: str) -> str | None:
    files = glob.glob(pattern)
    return max(files, key=os.path.getmtime) if files else None


def _partial_likelihood(path: str) -> dict | None:
    """What a likelihood evaluation stopped by its timeout saved (evaluation/batch_journal.py): the batches done
    of all, their images, mean bits/dim and NFE per pass; None for an unreadable journal."""
    saved = _load(os.path.dirname(path), os.path.basename(path))
    try:
        batches = list(saved["batches"].values())
        values = [v for batch in batches for v in batch["bpd"]]
        return {"batches_done": len(batches), "batches": len(saved["header"]["batches"]), "num_samples": len(values),
                "bits_per_dim": sum(values) / len(values), "mean_nfe": sum(b["nfe"] for b in batches) / len(batches),
                "seconds": sum(b["seconds"] for b in batches)}
    except (KeyError, TypeError, AttributeError, ZeroDivisionError):
        return None


def collect_run(workdir: str, out: str, extra: dict | None = None) -> dict:
    """OUT/run.json from the run folder (train_summary.json, the latest likelihood and samples records);
    the latest sample grid is copied to OUT/run_samples.png."""
    config = _load(workdir, "config.json") or {}
    training = config.get("training", {})
    run = {"date": _now(), "workdir": workdir, "config": "vp_cifar", "batch_size": training.get("batch_size"),
           "n_iters": training.get("n_iters"), "data_path": config.get("data", {}).get("path"), **(extra or {})}
    old = _load(out, RUN_FILE) or {}
    for key in ("planned_iters", "train_seconds_target", "likelihood_overrides"):  # from earlier calls
        if key in old and key not in run:
            run[key] = old[key]
    run["train"] = _load(workdir, "train_summary.json")
    lik = _latest(os.path.join(workdir, "likelihood", "likelihood_*.json"))
    run["likelihood"] = _load(os.path.dirname(lik), os.path.basename(lik)) if lik else None
    journal = _latest(os.path.join(workdir, "likelihood", "likelihood_*.json.partial"))
    run["likelihood_partial"] = _partial_likelihood(journal) if journal and not lik else None
    sample = _latest(os.path.join(workdir, "samples", "samples_*.json"))
    run["sample"] = _load(os.path.dirname(sample), os.path.basename(sample)) if sample else None
    run["grid"] = None
    grid = sample[: -len(".json")] + ".png" if sample else None
    if grid and os.path.exists(grid):
        with open(grid, "rb") as source:
            data = source.read()
        atomic_write(os.path.join(out, RUN_GRID), lambda handle: handle.write(data))
        run["grid"] = RUN_GRID
    write_json(os.path.join(out, RUN_FILE), run, indent=1)
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env")
    env.add_argument("--out", required=True)
    summary = sub.add_parser("summary")
    summary.add_argument("--work", required=True)
    summary.add_argument("--out", required=True)
    summary.add_argument("--mode", default="gpu")
    summary.add_argument("--total_seconds", type=float, default=0.0)
    summary.add_argument("--print", action="store_true", help="also print summary.md")
    append = sub.add_parser("append_training")
    append.add_argument("--into", required=True)
    append.add_argument("--add", required=True)
    iters = sub.add_parser("run_iters")
    iters.add_argument("--train_json", required=True)
    iters.add_argument("--seconds", type=float, required=True)
    iters.add_argument("--batch", type=int, default=128)
    defaults = sub.add_parser("likelihood_defaults")
    defaults.add_argument("--config", default="vp_cifar")
    collect = sub.add_parser("collect_run")
    collect.add_argument("--workdir", required=True)
    collect.add_argument("--out", required=True)
    collect.add_argument("--planned_iters", type=int, default=None)
    collect.add_argument("--train_seconds_target", type=float, default=None)
    collect.add_argument("--likelihood_overrides", default=None)
    args = parser.parse_args(argv)
    if args.command == "append_training":
        append_training(args.into, args.add)
        return 0
    if args.command == "run_iters":
        print(run_iters(args.train_json, args.seconds, args.batch))
        return 0
    if args.command == "likelihood_defaults":
        print(" ".join(likelihood_defaults(args.config)))
        return 0
    if args.command == "collect_run":
        extra = {k: getattr(args, k) for k in ("planned_iters", "train_seconds_target", "likelihood_overrides")
                 if getattr(args, k) is not None}
        collect_run(args.workdir, args.out, extra)
        return 0
    if args.command == "env":
        info = collect_env()
        write_json(args.out, info, indent=1)
        print(json.dumps(info, indent=1))
        return 0
    summarize(args.work, args.out, args.mode, args.total_seconds)
    if args.print:
        print(open(os.path.join(args.out, "summary.md"), encoding="utf-8").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
