"""The GPU check's records: the machine (`env`) and the summary of every step (`summary`) as JSON and Markdown.

Called by `benchmarks/gpu_check.sh`; never imports torch in `summary`, so a broken torch install still
gets its failure recorded.

    python benchmarks/gpu_check_report.py env --out OUT/env.json
    python benchmarks/gpu_check_report.py summary --work WORKDIR --out OUT
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from atomic_io import write_json, write_text  # noqa: E402

STEPS_FILE = "steps.tsv"  # one line per finished step, appended by gpu_check.sh
STEP_FIELDS = ("name", "status", "rc", "seconds", "timeout_s", "result", "note")


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
    lines = []
    for step in steps:
        if step["name"].startswith("tests"):
            lines.append(f"- {step['name']}: {step['note'] or step['status']}")
        report = _load(out, step["result"])
        if not report:
            continue
        for row in report.get("training", []):
            lines.append(f"- train {row['config']} batch {row['batch']} {row['precision']}"
                         f"{' compile' if row['compile'] else ''}: {_fmt(row['images_per_s'], '.1f')} images/s, "
                         f"MFU {_fmt(row['mfu'] * 100, '.1f')} % (bf16 matmul "
                         f"{report['bf16_matmul_flops'] / 1e12:.1f} TFLOP/s)")
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
    return lines


def summarize(work: str, out: str, mode: str, total_s: float) -> dict:
    """Write OUT/steps.json, OUT/summary.md and OUT/gpu_check.log from the work folder; return the report."""
    steps = read_steps(work)
    env = _load(out, "env.json") or {}
    report = {"date": _now(), "mode": mode, "gpu": env.get("gpu"), "torch": env.get("torch"),
              "total_seconds": total_s, "all_ok": bool(steps) and all(s["status"] == "ok" for s in steps),
              "steps": steps}
    write_json(os.path.join(out, "steps.json"), report, indent=1)
    lines = [f"# GPU check ({mode}), {report['date']}", "",
             f"device: {env.get('gpu') or 'CPU'}; torch {env.get('torch')}; nvidia-smi: {env.get('nvidia_smi', '-')}",
             f"total {total_s:.0f} s; {'all steps ok' if report['all_ok'] else 'SOME STEPS FAILED'}", "",
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
    args = parser.parse_args(argv)
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
