"""`--mode likelihood`: bits/dim of a trained model on a data split through the probability-flow ODE.

Images: uniformly dequantized 8-bit data, bits/dim with the scaling log-determinant and 8-bit offset
(see likelihood/bpd.py). Toys: exact samples of the toy distribution (a fixed set per split and seed),
reported in nats/dim and bits/dim without dequantization; for the analytic mixtures the exact
-log p_eps of the same points is reported next to it. The report is printed and written atomically as JSON to
`WORKDIR/likelihood/likelihood_{split}[_h<hash>].json`, one file per setting: the hash appears when a setting
that changes the result (config.likelihood, --num_batches, seed, the data set and data.path) differs from the
config's defaults (evaluation/outputs.py); the settings are recorded in the report. Each finished batch is saved in
`likelihood_{split}[_h<hash>].json.partial` (evaluation/batch_journal.py): the same command run again after a
kill resumes from the batches done (single process; under torchrun every process starts over).
"""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import torch

from atomic_io import write_json
from errors import UserError
from evaluation.batch_journal import JOURNAL_SUFFIX, BatchJournal
from evaluation.outputs import default_config, result_stem
from evaluation.progress import ProgressScore, nfe_bar
from likelihood import (bits_per_dim, ddpm_bound_bpd, eps_fn_from_score, log_likelihood, mean_and_stderr,
                        nats_per_dim, nats_to_bits)
from sde_lib import VPSDE, get_sde, subVPSDE
from training import distributed
from validation import check_output_files, check_settings

SPLITS = ("train", "test")
_SPLIT_SALT = {"train": 0x7A, "test": 0x7E}  # toy splits: disjoint seeds, never the training stream's


def likelihood_continuous(config) -> bool:
    """Whether the PF-ODE sees the network as a continuous-time score: always for continuously trained models,
    and for discrete ones unless likelihood.continuous_score is false (the reference protocol evaluates every
    model with continuous=True)."""
    return bool(config.training.continuous) or bool(config.likelihood.get("continuous_score", True))


def likelihood_score_fns(config, sde, model):
    """(score_fn for the PF-ODE, score_fn for the DDPM bound) of a network: the first as `likelihood_continuous`
    says; the bound is a sum over the discrete chain, so it uses the step-wise score of discrete training."""
    import models

    options = models.score_fn_options(config)
    if not config.training.continuous and str(config.sde.name).lower() == "vpsde":
        # the continuous-time score of a network trained on DDPM's N steps: its labels are t (N - 1), the step
        # positions it saw (999 t only for N = 1000, the reference's case; other N got labels it never saw)
        options["vp_label_scale"] = float(int(config.sde.num_scales) - 1)
    return (models.get_score_fn(sde, model, continuous=likelihood_continuous(config), **options),
            models.get_score_fn(sde, model, continuous=bool(config.training.continuous),
                                **models.score_fn_options(config)))


def check_likelihood_choices(config) -> None:
    """likelihood.method, error_norm and divergence name things the likelihood knows (one line, before work)."""
    from likelihood.divergence import DIVERGENCES
    from likelihood.ode import ERROR_NORMS, step_free_methods

    lk = config.likelihood
    for key, valid in (("method", step_free_methods()), ("error_norm", ERROR_NORMS), ("divergence", DIVERGENCES)):
        value = lk[key]  # every config has them (saved ones get new keys from the defaults)
        if value not in valid:
            raise UserError(f"likelihood.{key} must be one of {', '.join(valid)}; got {value!r}")


def _likelihood_options(config) -> dict:
    lk = config.likelihood
    return {"eps": float(lk.eps), "method": str(lk.method), "rtol": float(lk.rtol), "atol": float(lk.atol),
            "divergence": str(lk.divergence), "n_probes": int(lk.n_probes),
            "error_norm": str(lk.get("error_norm", "per_dim"))}


def _toy_points(config, split: str, count: int) -> torch.Tensor:
    """A fixed set of `count` exact samples of the toy distribution for (seed, split)."""
    from data.toys import sample_toy

    seed = np.random.SeedSequence([int(config.seed) & 0xFFFFFFFF, _SPLIT_SALT[split]]).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(seed))
    try:
        return sample_toy(str(config.data.dataset), count, generator=generator, dtype=torch.float64)
    except ValueError as error:
        raise UserError(str(error)) from None


def _batches(total: int, batch_size: int, num_batches: int) -> list[tuple[int, int]]:
    """(start, end) row ranges: `num_batches` batches (0 = all rows)."""
    ranges = [(s, min(s + batch_size, total)) for s in range(0, total, batch_size)]
    return ranges if num_batches <= 0 else ranges[:num_batches]


def _is_number(value, integer: bool = False) -> bool:
    """A real number (bool excluded), an int when `integer`."""
    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool)


def _open_journal(journal: tuple[str, dict] | None, ranges, info, *values_keys: str,
                  counts: tuple[str, ...] = ()) -> BatchJournal | None:
    """The batch journal of (path, header) for these batch ranges (None without a path or under torchrun); every
    saved batch must hold one number per row under each of `values_keys` (NaN / inf allowed: a diverged ODE is a
    result), a finite non-negative NFE and seconds, and a non-negative int under each of `counts`."""
    if journal is None or info.world_size > 1:
        return None
    path, header = journal

    def check_entry(index: int, entry: dict) -> None:
        if not 0 <= index < len(ranges):
            raise ValueError(f"batch {index} is not one of the {len(ranges)} batches")
        lo, hi = ranges[index]
        for key in values_keys:
            values = entry.get(key)
            if not isinstance(values, list) or len(values) != hi - lo or not all(map(_is_number, values)):
                raise ValueError(f"batch {index} does not hold {hi - lo} values under {key!r}")
        for key in ("nfe", "seconds"):
            if not (_is_number(entry.get(key)) and 0 <= entry[key] < float("inf")):
                raise ValueError(f"batch {index}: {key!r} is not a finite non-negative number")
        for key in counts:
            if not (_is_number(entry.get(key), integer=True) and entry[key] >= 0):
                raise ValueError(f"batch {index}: {key!r} is not a non-negative integer")

    opened = BatchJournal.open(path, {**header, "batches": [list(r) for r in ranges]}, check_entry)
    if opened.done:
        print(f"resuming from {path}: {len(opened.done)} of {len(ranges)} batches done")
    return opened


def _as_list(values: torch.Tensor) -> list[float]:
    return [float(v) for v in values.double().cpu().reshape(-1)]


def evaluate_toy(config, sde, score_fn, split: str, num_batches: int, device: torch.device,
                 progress: bool = True, journal: tuple[str, dict] | None = None) -> dict:
    """nats/dim and bits/dim of toy data (no dequantization), with mean NFE and samples/s."""
    from data.mixtures import TOY_MIXTURES, toy_mixture

    batch_size = int(config.likelihood.batch_size)
    count = batch_size * num_batches if num_batches > 0 else int(config.likelihood.toy_num_samples)
    points = _toy_points(config, split, count)
    dim = points.shape[1]
    options = _likelihood_options(config)
    entries = {}
    mixture = toy_mixture(str(config.data.dataset)) if str(config.data.dataset) in TOY_MIXTURES else None
    start_time = time.perf_counter()
    ranges, info = _batches(count, batch_size, 0), distributed.current_info()
    mine = distributed.my_share(len(ranges), info)
    saved = _open_journal(journal, ranges, info, "nats", *(["reference"] if mixture is not None else []))
    reused = {index: saved.done[index] for index in mine if saved is not None and index in saved.done}
    with nfe_bar(None, f"likelihood {split} ({len(mine)} batches)", progress and info.is_main) as bar:
        counted = ProgressScore(score_fn, bar)  # the bar counts every score evaluation
        for done, index in enumerate(mine, 1):
            if index in reused:
                entries[index] = reused[index]
                continue
            batch_start = time.perf_counter()
            lo, hi = ranges[index]
            generator = torch.Generator(device=device).manual_seed(distributed.batch_seed(int(config.seed), index))
            x = points[lo:hi].to(device=device, dtype=torch.float32)
            logp, _, nfe = log_likelihood(sde, counted, x, generator=generator, **options)
            entry = {"nats": _as_list(nats_per_dim(logp.double(), dim)), "nfe": int(nfe)}
            if mixture is not None:
                entry["reference"] = _as_list(nats_per_dim(mixture.marginal_log_prob(points[lo:hi], options["eps"],
                                                                                    sde), dim))
            entries[index] = {**entry, "seconds": time.perf_counter() - batch_start}
            if saved is not None:
                saved.record(index, entries[index])
            so_far = torch.tensor([v for e in entries.values() for v in e["nats"]], dtype=torch.float64)
            bar.set_postfix(batch=f"{done}/{len(mine)}", nats_per_dim=f"{so_far.mean():.4f}", nfe_per_pass=nfe)
    _synchronize(device)
    entries = distributed.gather_indexed(entries, info)
    nats = [torch.tensor(e["nats"], dtype=torch.float64) for e in entries]
    nfes = [e["nfe"] for e in entries]
    seconds = time.perf_counter() - start_time + sum(e["seconds"] for e in reused.values())
    mean, stderr = mean_and_stderr(torch.cat(nats))
    report = {"nats_per_dim": mean, "nats_per_dim_stderr": stderr,
              "bits_per_dim": nats_to_bits(mean), "bits_per_dim_stderr": nats_to_bits(stderr),
              "num_samples": count, "dim": dim, "dequantized": False,
              "mean_nfe": float(np.mean(nfes)), "total_nfe": int(np.sum(nfes)), "samples_per_s": count / seconds,
              "seconds": seconds}
    if mixture is not None:
        ref_mean, ref_err = mean_and_stderr([v for e in entries for v in e["reference"]])
        report.update(exact_nats_per_dim=ref_mean, exact_nats_per_dim_stderr=ref_err)
    return report


def evaluate_images(config, sde, score_fn, split: str, num_batches: int, device: torch.device,
                    progress: bool = True, bound_score_fn=None, journal: tuple[str, dict] | None = None) -> dict:
    """Bits/dim of dequantized 8-bit images (mean and standard error over images), mean NFE, images/s.

    `bound_score_fn` (default `score_fn`) is the discrete-time score the DDPM bound uses (likelihood.ddpm_bound).
    """
    from data.loaders import load_image_dataset
    from data.transforms import data_scale

    images, _ = load_image_dataset(config, split)
    images = torch.from_numpy(np.ascontiguousarray(images))
    batch_size = int(config.likelihood.batch_size)
    ranges = _batches(images.shape[0], batch_size, num_batches)
    options = _likelihood_options(config)
    scale = data_scale(config)
    entries = {}
    with_bound = bool(config.likelihood.get("ddpm_bound", False))
    if with_bound:
        eps_fn = _ddpm_eps_fn(config, sde, score_fn if bound_score_fn is None else bound_score_fn)
    start_time = time.perf_counter()
    info = distributed.current_info()  # under torchrun: this process's share of the batches, then a gather
    mine = distributed.my_share(len(ranges), info)
    if journal is not None:  # the same settings on other images (another data.path) must not reuse batches
        journal = (journal[0], {**journal[1], "images": hashlib.sha256(images.numpy().tobytes()).hexdigest()})
    saved = _open_journal(journal, ranges, info, "bpd", *(["bound"] if with_bound else []), counts=("total_nfe",))
    reused = {index: saved.done[index] for index in mine if saved is not None and index in saved.done}
    num_dequant = int(config.likelihood.num_dequant)
    with nfe_bar(None, f"bits/dim {split} ({len(mine)} batches x {num_dequant} passes)",
                 progress and info.is_main) as bar:
        counted = ProgressScore(score_fn, bar)  # the bar counts every score evaluation (all passes)
        for done, index in enumerate(mine, 1):
            if index in reused:
                entries[index] = reused[index]
                continue
            batch_start = time.perf_counter()
            lo, hi = ranges[index]
            generator = torch.Generator(device=device).manual_seed(distributed.batch_seed(int(config.seed), index))
            batch = images[lo:hi].to(device)
            bpd, nfe = bits_per_dim(sde, counted, batch, data_scale=scale, num_dequant=num_dequant,
                                    generator=generator, **options)
            # NFE per pass (one ODE solve) and in total
            entry = {"bpd": _as_list(bpd), "nfe": nfe / num_dequant, "total_nfe": int(nfe)}
            if with_bound:
                num_terms = int(config.likelihood.ddpm_num_terms) or None
                entry["bound"] = _as_list(ddpm_bound_bpd(sde, eps_fn, batch, data_scale=scale, generator=generator,
                                                         variance=str(config.likelihood.ddpm_variance),
                                                         num_terms=num_terms))
            entries[index] = {**entry, "seconds": time.perf_counter() - batch_start}
            if saved is not None:
                saved.record(index, entries[index])
            so_far = torch.tensor([v for e in entries.values() for v in e["bpd"]], dtype=torch.float64)
            bar.set_postfix(batch=f"{done}/{len(mine)}", bpd=f"{so_far.mean():.4f}",
                            nfe_per_pass=f"{nfe / num_dequant:.0f}")
    _synchronize(device)
    entries = distributed.gather_indexed(entries, info)
    seconds = time.perf_counter() - start_time + sum(e["seconds"] for e in reused.values())
    count = sum(hi - lo for lo, hi in ranges)
    mean, stderr = mean_and_stderr(torch.tensor([v for e in entries for v in e["bpd"]], dtype=torch.float64))
    nfes, totals = [e["nfe"] for e in entries], [e["total_nfe"] for e in entries]
    report = {"bits_per_dim": mean, "bits_per_dim_stderr": stderr, "num_samples": count,
              "dim": int(images[0].numel()), "dequantized": True, "num_dequant": int(config.likelihood.num_dequant),
              "data_scale": list(scale), "mean_nfe": float(np.mean(nfes)), "total_nfe": int(np.sum(totals)),
              "images_per_s": count / seconds,
              "seconds": seconds}
    if with_bound:
        report["ddpm_bound_bits_per_dim"], report["ddpm_bound_stderr"] = mean_and_stderr(
            [v for e in entries for v in e["bound"]])
    return report


def _ddpm_eps_fn(config, sde, score_fn):
    if not isinstance(sde, VPSDE) or isinstance(sde, subVPSDE) or config.training.continuous:
        raise UserError("likelihood.ddpm_bound needs a VP model trained in discrete time "
                        "(sde.name='vpsde', training.continuous=False)")
    return eps_fn_from_score(sde, score_fn)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(config, sde, score_fn, split: str, num_batches: int, device: torch.device, progress: bool = True,
             bound_score_fn=None, journal: tuple[str, dict] | None = None) -> dict:
    """The likelihood report of `score_fn` on a split of config.data (toy or image); `bound_score_fn`: see
    `evaluate_images`; `journal` = (path, header): save every batch there and reuse the batches an earlier run
    with the same header saved (evaluation/batch_journal.py)."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if num_batches < 0:
        raise UserError(f"the number of batches must be >= 0 (0 = whole split), got {num_batches}")
    if int(config.likelihood.batch_size) < 1:
        raise UserError(f"likelihood.batch_size must be >= 1, got {config.likelihood.batch_size}")
    if str(config.data.kind) == "image":
        report = evaluate_images(config, sde, score_fn, split, num_batches, device, progress, bound_score_fn,
                                 journal=journal)
    else:
        report = evaluate_toy(config, sde, score_fn, split, num_batches, device, progress, journal=journal)
    report.update(split=split, dataset=str(config.data.dataset), sde=str(config.sde.name),
                  device=str(device), **_likelihood_options(config))
    return report


def format_report(report: dict) -> str:
    """One human-readable summary line."""
    rate = report.get("images_per_s", report.get("samples_per_s"))
    line = (f"{report['dataset']} {report['split']}: {report['bits_per_dim']:.4f} ± {report['bits_per_dim_stderr']:.4f}"
            f" bits/dim")
    if "nats_per_dim" in report:
        line += f" ({report['nats_per_dim']:.4f} ± {report['nats_per_dim_stderr']:.4f} nats/dim"
        if "exact_nats_per_dim" in report:
            line += f"; exact model {report['exact_nats_per_dim']:.4f}"
        line += ")"
    if "ddpm_bound_bits_per_dim" in report:
        line += f", DDPM bound {report['ddpm_bound_bits_per_dim']:.4f} ± {report['ddpm_bound_stderr']:.4f}"
    total = f", {report['total_nfe']} in total" if "total_nfe" in report else ""
    return line + (f", n={report['num_samples']}, NFE {report['mean_nfe']:.1f} per pass (one ODE solve of a "
                   f"batch){total}, {rate:.2f} {'images' if report['dequantized'] else 'samples'}/s")


def likelihood_settings(config, num_batches: int) -> dict:
    """Every setting that changes a likelihood report (besides the split, which is in the file name)."""
    lk = config.likelihood
    return {**_likelihood_options(config), "seed": int(config.seed), "num_batches": int(num_batches),
            "dataset": str(config.data.dataset), "data_path": str(config.data.get("path", "") or ""),
            "continuous_score": likelihood_continuous(config),
            "batch_size": int(lk.batch_size), "num_dequant": int(lk.num_dequant),
            "toy_num_samples": int(lk.toy_num_samples), "ddpm_bound": bool(lk.get("ddpm_bound", False)),
            "ddpm_variance": str(lk.get("ddpm_variance", "")), "ddpm_num_terms": int(lk.get("ddpm_num_terms", 0))}


def results_path(config, workdir: str, split: str, args) -> tuple[str, dict]:
    """(path, settings) of the likelihood report of a run: `WORKDIR/likelihood/likelihood_{split}[_h<hash>].json`."""
    num_batches = int(config.likelihood.num_batches) if args.num_batches is None else int(args.num_batches)
    settings = likelihood_settings(config, num_batches)
    defaults = default_config(args, workdir)
    default_settings = (None if defaults is None
                        else likelihood_settings(defaults, int(defaults.likelihood.num_batches)))
    stem = result_stem(f"likelihood_{split}", settings, default_settings)
    return os.path.join(workdir, "likelihood", stem + ".json"), settings


def run(config, workdir: str, args) -> int:
    """Entry point of `main.py --mode likelihood`."""
    from training.device import get_device

    split = args.split or str(config.likelihood.split)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if args.num_batches is not None and args.num_batches <= 0:
        raise UserError(f"--num_batches must be positive, got {args.num_batches}")
    check_settings(config, args, "likelihood", get_sde)  # also when called without main.py
    check_likelihood_choices(config)
    path, settings = results_path(config, workdir, split, args)
    check_output_files([path, path + JOURNAL_SUFFIX])  # before the work, not after
    group = distributed.setup(get_device(config))  # `torchrun --nproc_per_node=K`: the batches are shared
    try:
        device = distributed.local_device(get_device(config), group)
        report, step = _evaluate_run(config, workdir, split, args, device, (path + JOURNAL_SUFFIX, settings))
    finally:
        distributed.cleanup(group)
    if not group.is_main:
        return 0
    report["step"] = step
    report["settings"] = settings
    print(format_report(report))
    write_json(path, report, sort_keys=True)
    BatchJournal(path + JOURNAL_SUFFIX, {}).finish()  # the report holds every batch now
    print(f"wrote {path}")
    return 0


def _evaluate_run(config, workdir: str, split: str, args, device: torch.device,
                  journal: tuple[str, dict]) -> tuple[dict, int]:
    """The likelihood report of the run's EMA weights on `split`, and the checkpoint step; batches are saved to
    and resumed from the journal (path, settings) for this checkpoint step."""
    from evaluation.run import load_run
    from training.checkpoint import checkpoint_path, stored_digest
    from training.device import strict_float32

    weights = stored_digest(checkpoint_path(workdir))  # read again after loading: the loaded bytes are these
    run = load_run(workdir, device, config=config)  # parameters frozen: the divergence needs grads w.r.t. x only
    sde, step = run.sde, run.step
    score_fn, bound_score_fn = likelihood_score_fns(config, sde, run.model)
    num_batches = int(config.likelihood.num_batches) if args.num_batches is None else int(args.num_batches)
    with strict_float32():  # no TF32 convolutions/matmuls on GPUs: the likelihood stays float32
        path, settings = journal
        header = {"settings": settings, "split": split, "step": None if step is None else int(step),
                  "weights": weights,  # the same step of another run differs
                  "device": device.type}  # GPU and CPU numbers differ in the last digits: not mixed
        unchanged = weights == stored_digest(checkpoint_path(workdir))  # no trainer replaced it while it loaded
        if not unchanged:
            print(f"note: {checkpoint_path(workdir)} was replaced while it loaded (a training run?): this run's "
                  "batches are not saved for a resume")
        report = evaluate(config, sde, score_fn, split, num_batches, device, bound_score_fn=bound_score_fn,
                          journal=(path, header) if unchanged else None)
    report["score"] = "continuous" if likelihood_continuous(config) else "discrete"
    return report, step
