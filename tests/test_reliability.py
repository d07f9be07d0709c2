"""Crash safety and verified files (issue 12): kill -9 during sample / likelihood, full disk, checksummed
checkpoints (byte flips, NaN weights, files from before checksums), stale temp files, data pickles that try to
run code, results that never overwrite results made with other settings."""
from __future__ import annotations

import errno
import glob
import json
import math
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import main
from errors import UserError
from training import checkpoint as ckpt_mod
from training.checkpoint import MAGIC, checkpoint_path, load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["--config.model.hidden_dim=16", "--config.model.num_layers=2", "--config.model.embedding_dim=8",
       "--config.device=cpu"]
SAMPLE = ["--mode", "sample", "--config", "vp_toy", "--nfe", "4", "--num_samples", "20", *TOY]
LIKELIHOOD = ["--mode", "likelihood", "--config", "vp_toy", "--num_batches", "1", "--config.likelihood.batch_size=4",
              "--config.likelihood.rtol=1e-2", "--config.likelihood.atol=1e-2", *TOY]


def _toy_config():
    import configs

    config = configs.get_config("vp_toy")
    configs.apply_overrides(config, [a[len("--config."):] for a in TOY])
    return config


def _write_checkpoint(workdir, seed):
    """An untrained checkpoint whose weights depend on `seed` (so outputs of two checkpoints differ)."""
    import models
    from training.checkpoint import FORMAT_VERSION, config_to_json

    config = _toy_config()
    torch.manual_seed(seed)
    model = models.create_model(config)
    ema = models.ExponentialMovingAverage(model, float(config.model.ema_rate))
    save_checkpoint(checkpoint_path(workdir), {"format": FORMAT_VERSION, "model": model.state_dict(),
                                               "ema": ema.state_dict(), "optimizer": {}, "step": seed,
                                               "config": config_to_json(config)})


def _files(root) -> dict:
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """A run with outputs of checkpoint A (this setting and another setting), then checkpoint B in place."""
    workdir = str(tmp_path_factory.mktemp("earlier") / "run")
    _write_checkpoint(workdir, seed=1)
    assert main.main([*SAMPLE, "--workdir", workdir]) == 0
    assert main.main([*SAMPLE, "--workdir", workdir, "--seed", "5"]) == 0  # other settings: must survive
    assert main.main([*LIKELIHOOD, "--workdir", workdir]) == 0
    assert main.main([*LIKELIHOOD, "--workdir", workdir, "--config.likelihood.eps=1e-4"]) == 0
    _write_checkpoint(workdir, seed=2)  # the runs below write new results over the same names
    return workdir


def _other_settings(files: dict) -> list[str]:
    """The result files made with other settings than the runs below (seed 5; likelihood eps 1e-4)."""
    return [rel for rel, data in files.items() if "seed5" in rel or (
        rel.startswith("likelihood") and json.loads(data)["settings"]["eps"] == 1e-4)]


def _check_outputs(workdir, before: dict) -> None:
    """Every file under a final name is complete (the earlier one or a new one); none was destroyed; results
    of other settings are byte for byte the earlier ones."""
    now = _files(workdir)
    for rel, data in now.items():
        name = os.path.basename(rel)
        if name.startswith(".tmp_"):
            continue  # a killed writer's temp file: removed by the next run (checked separately)
        if name.endswith(".npz"):
            assert np.load(os.path.join(workdir, rel))["samples"].shape == (20, 2), rel
        elif name.endswith(".json"):
            json.loads(data)
        elif name.endswith(".png"):
            assert data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82"), rel
    assert set(before) <= set(now), f"destroyed: {set(before) - set(now)}"
    for rel in _other_settings(before):
        assert now[rel] == before[rel], f"{rel} (other settings) changed"


_KILLER = r"""
import os, signal, sys
sys.path.insert(0, {root!r})
point, nth = os.environ["KILL_AT"].split(":")
count = [0]
def hook(real):
    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return wrapped
# inside the atomic writer: data in the temp file, not yet synced / renamed (each file is fsynced, renamed, then
# its folder fsynced: fsync:1 is the first file's data, fsync:3 the second's)
if point in ("fsync", "replace"):
    setattr(os, point, hook(getattr(os, point)))
elif point == "compute":  # in the middle of the work, before any output is written
    import evaluation.sample_runner as s, evaluation.likelihood_runner as l
    s.generate = hook(s.generate)
    l.evaluate = hook(l.evaluate)
elif point == "batch":  # at the start of the nth batch (its sampler or ODE solve), earlier batches saved
    import solvers, evaluation.likelihood_runner as l
    solvers.sample = hook(solvers.sample)
    l.log_likelihood = hook(l.log_likelihood)
import main
sys.exit(main.main(sys.argv[1:]))
"""


def _kill_runs(base, tmp_path, cases):
    """Start every (name, argv, kill point) on its own copy of `base` at once; return {name: (workdir, rc)}."""
    procs = {}
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    for name, argv, point in cases:
        workdir = str(tmp_path / name)
        shutil.copytree(base, workdir)
        code = _KILLER.format(root=ROOT)
        procs[name] = (workdir, subprocess.Popen([sys.executable, "-c", code, *argv, "--workdir", workdir],
                                                 env={**env, "KILL_AT": point}, cwd=ROOT,
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return {name: (workdir, proc.wait(timeout=300)) for name, (workdir, proc) in procs.items()}


def _assert_killed_and_intact(results, base_files):
    for name, (workdir, rc) in results.items():
        assert rc == -9, f"{name}: the process was not killed (exit {rc})"
        _check_outputs(workdir, base_files)
        # the next run removes the killed writer's temp files and completes
        assert main.main([*(SAMPLE if "sample" in name else LIKELIHOOD), "--workdir", workdir]) == 0
        assert not [p for p in glob.glob(os.path.join(workdir, "**", ".tmp_*"), recursive=True)], name


def test_kill_during_the_write_of_sample_and_likelihood_outputs(earlier_run, tmp_path):
    """SIGKILL inside the atomic writer (data written, before fsync / before the rename): earlier outputs intact."""
    base_files = _files(earlier_run)
    assert len(_other_settings(base_files)) == 4  # sample npz/json/png of seed 5, likelihood with eps 1e-4
    results = _kill_runs(earlier_run, tmp_path, [("sample_fsync1", SAMPLE, "fsync:1"),
                                                 ("likelihood_replace1", LIKELIHOOD, "replace:1")])
    for workdir, _ in results.values():  # killed before the first rename: every earlier file is as it was
        now = {rel: data for rel, data in _files(workdir).items() if not os.path.basename(rel).startswith(".tmp_")}
        assert now == base_files
    assert any(".tmp_" in rel for rel in _files(results["sample_fsync1"][0]))  # it died mid-write
    _assert_killed_and_intact(results, base_files)


@pytest.mark.slow
def test_kill_at_every_moment_of_sample_and_likelihood(earlier_run, tmp_path):
    """SIGKILL while computing, mid-write of each file, and between the files of one result."""
    base_files = _files(earlier_run)
    cases = [("sample_compute", SAMPLE, "compute:1"), ("sample_replace1", SAMPLE, "replace:1"),
             ("sample_replace2", SAMPLE, "replace:2"), ("sample_fsync3", SAMPLE, "fsync:3"),
             ("sample_replace3", SAMPLE, "replace:3"), ("likelihood_compute", LIKELIHOOD, "compute:1"),
             ("likelihood_fsync1", LIKELIHOOD, "fsync:1")]
    _assert_killed_and_intact(_kill_runs(earlier_run, tmp_path, cases), base_files)


def test_full_disk_at_the_write_keeps_earlier_outputs(earlier_run, tmp_path, capsys, monkeypatch):
    """A simulated ENOSPC when the sample npz is committed: one line naming it, earlier files kept, no temp left."""
    workdir = str(tmp_path / "run")
    shutil.copytree(earlier_run, workdir)
    before = _files(workdir)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert main.main([*SAMPLE, "--workdir", workdir]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]  # (the sampling bar is there too)
    assert "Traceback" not in err and len(lines) == 1, err
    assert "no space left on device" in lines[0] and ".npz" in lines[0], lines
    assert _files(workdir) == before


def test_stale_temp_files_are_removed_at_start_live_ones_kept(earlier_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(earlier_run, workdir)
    dead = [os.path.join(workdir, sub, ".tmp_999999999_k3x9_q0a.npz") for sub in ("samples", "checkpoints", "likelihood")]
    live = os.path.join(workdir, "samples", f".tmp_{os.getppid()}_l1ve2abc.npz")
    # the user's own files named .tmp_* are not the writers' (no pid + mkstemp's 8 characters): never deleted
    users = [os.path.join(workdir, ".tmp_notes.txt"), os.path.join(workdir, "samples", ".tmp_mydata.npz"),
             os.path.join(workdir, "samples", ".tmp_999999999_x.npz")]
    for path in dead + [live] + users:
        open(path, "wb").write(b"partial")
    assert main.main([*SAMPLE, "--workdir", workdir, "--nfe", "2"]) == 0
    assert not any(os.path.exists(p) for p in dead) and os.path.exists(live)
    assert all(os.path.exists(p) for p in users)


# --- checkpoints ------------------------------------------------------------------------------------------------
def test_every_flipped_byte_of_a_checkpoint_is_found(tmp_path):
    workdir = str(tmp_path)
    _write_checkpoint(workdir, seed=3)
    path = checkpoint_path(workdir)
    data = open(path, "rb").read()
    assert data.startswith(MAGIC) and load_checkpoint(path)["step"] == 3
    positions = sorted(set(list(range(0, 100)) + list(np.linspace(0, len(data) - 1, 300).astype(int))))
    for position in positions:
        damaged = bytearray(data)
        damaged[position] ^= 0x01
        open(path, "wb").write(bytes(damaged))
        with pytest.raises(UserError, match="checkpoint.pt is damaged: its content does not match the checksum"
                           ) as info:
            load_checkpoint(path)
        assert "\n" not in str(info.value) and "weights_only" not in str(info.value)
    open(path, "wb").write(data[:-1])
    with pytest.raises(UserError, match="does not match the checksum"):
        load_checkpoint(path)
    open(path, "wb").write(data + b"\0")
    with pytest.raises(UserError, match="does not match the checksum"):
        load_checkpoint(path)


def test_checkpoints_without_a_checksum_still_load_with_one_note(tmp_path, capsys, monkeypatch):
    workdir = str(tmp_path)
    _write_checkpoint(workdir, seed=4)
    path = checkpoint_path(workdir)
    state = load_checkpoint(path)
    torch.save(state, path)  # the layout before checksums
    monkeypatch.setattr(ckpt_mod, "_legacy_noted", False)
    for _ in range(2):
        assert load_checkpoint(path)["step"] == 4
    err = capsys.readouterr().err
    assert err.count("has no checksum") == 1 and len(err.strip().splitlines()) == 1


def test_non_finite_weights_are_never_written_nor_loaded(tmp_path):
    workdir = str(tmp_path)
    _write_checkpoint(workdir, seed=5)
    path = checkpoint_path(workdir)
    before = open(path, "rb").read()
    state = load_checkpoint(path)
    state["ema"]["shadow_params"][0].view(-1)[0] = float("nan")
    with pytest.raises(UserError, match="refusing to write .*NaN/inf.*EMA weight #0"):
        save_checkpoint(path, state)
    assert open(path, "rb").read() == before
    torch.save(state, path)  # written by something else
    with pytest.raises(UserError, match="NaN/inf in 1 weight tensor"):
        load_checkpoint(path)


def test_divergence_check_covers_the_ema_weights(tmp_path, monkeypatch):
    """Loss and gradient stay finite, the EMA becomes NaN: the run stops, the last checkpoint is good."""
    import models
    from test_training import tiny_config
    from training.trainer import TrainingDiverged, train

    config = tiny_config(n_iters=20)
    real = models.ExponentialMovingAverage.update
    calls = {"n": 0}

    def poisoned(self, model):
        real(self, model)
        calls["n"] += 1
        if calls["n"] == 10:
            self.shadow_params[0].view(-1)[0] = float("inf")

    monkeypatch.setattr(models.ExponentialMovingAverage, "update", poisoned)
    with pytest.raises(TrainingDiverged, match="EMA weights became NaN/inf between steps 9 and 12"):
        train(config, str(tmp_path))
    state = load_checkpoint(checkpoint_path(str(tmp_path)))
    assert state["step"] == 8 and all(torch.isfinite(t).all() for t in state["ema"]["shadow_params"])


# --- data files never run code ----------------------------------------------------------------------------------
class _Payload:
    """Unpickling this calls os.system: a file appears if the code runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_pickle_that_would_run_code_is_refused(tmp_path, protocol):
    from data.cifar10 import load_cifar10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    rows = np.zeros((2, 3072), np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rows, b"labels": [0, 1], b"batch_label": _Payload(marker)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    with pytest.raises(UserError, match=r"data_batch_1.*refused: it refers to (posix|os|nt)\.system") as info:
        load_cifar10(str(tmp_path), "train")
    assert "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_pickles_of_every_protocol_still_load(tmp_path, protocol):
    from data.cifar10 import load_cifar10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(protocol)
    rows = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": rows, b"labels": [1, 2, 3],
                                                      b"filenames": [b"a.png", b"b.png", b"c.png"],
                                                      b"batch_label": b"testing batch 1 of 1"}, protocol=protocol))
    images, labels = load_cifar10(str(tmp_path), "test")
    assert np.array_equal(images.reshape(3, 3072), rows) and labels.tolist() == [1, 2, 3]


# --- results of other settings are never overwritten --------------------------------------------------------------
def test_results_with_other_settings_get_other_names(earlier_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(earlier_run, workdir)
    names = set(os.listdir(os.path.join(workdir, "samples")))
    for extra in (["--config.sampling.eps=1e-2"], ["--config.sampling.batch_size=7"], ["--num_samples", "21"]):
        assert main.main([*SAMPLE, "--workdir", workdir, *extra]) == 0
        new = set(os.listdir(os.path.join(workdir, "samples"))) - names
        assert len(new) == 3, (extra, new)  # npz, json, png of their own
        names |= new
    likelihoods = os.listdir(os.path.join(workdir, "likelihood"))
    assert len(likelihoods) == 2 and all(n.startswith("likelihood_test_h") for n in likelihoods)
    reports = [json.load(open(os.path.join(workdir, "likelihood", n))) for n in likelihoods]
    assert sorted(r["settings"]["eps"] for r in reports) == [1e-5, 1e-4]


# --- every write goes through atomic_io -------------------------------------------------------------------------
_DIRECT_WRITES = [
    (r"open\([^)]*,\s*[\"'](w|a|x)b?\+?[\"']", "open(..., 'w')"),
    (r"np\.savez(_compressed)?\(", "np.savez"),
    (r"torch\.save\((?![^)]*\b(buffer|handle)\b)", "torch.save to a path"),
    (r"\.savefig\((?![^)]*\bbuffer\b)", "savefig to a path"),
    (r"imsave\((?![^)]*\bbuffer\b)", "imsave to a path"),
    (r"json\.dump\(", "json.dump to a file"),
]


def test_no_code_writes_a_file_except_through_atomic_io():
    """A static guard: the toolkit's code (not its tests) never writes a final path directly."""
    import re

    offenders = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "runs", "__pycache__")
                   and not d.endswith(".egg-info")]
        for name in names:
            if not name.endswith(".py") or name == "atomic_io.py":
                continue
            path = os.path.join(folder, name)
            for number, line in enumerate(open(path, encoding="utf-8"), 1):
                code = line.split("#", 1)[0]
                for pattern, what in _DIRECT_WRITES:
                    if re.search(pattern, code):
                        offenders.append(f"{os.path.relpath(path, ROOT)}:{number}: {what}")
    assert not offenders, offenders


def test_atomic_writes_get_the_umask_and_leave_nothing_behind_on_failure(tmp_path):
    import atomic_io

    old = os.umask(0o022)
    try:
        atomic_io.write_json(tmp_path / "a.json", {"x": 1})
        assert os.stat(tmp_path / "a.json").st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_io.save_npz(tmp_path / "b.npz", samples=np.zeros(3))
        assert os.stat(tmp_path / "b.npz").st_mode & 0o777 == 0o600
    finally:
        os.umask(old)

    def broken(handle):
        handle.write(b"half")
        raise RuntimeError("serializer failed")

    with pytest.raises(RuntimeError):
        atomic_io.atomic_write(tmp_path / "a.json", broken)
    assert json.load(open(tmp_path / "a.json")) == {"x": 1} and sorted(os.listdir(tmp_path)) == ["a.json", "b.npz"]
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(UserError, match="it is a folder"):
        atomic_io.write_json(tmp_path / "folder.json", {})


class _Killed(Exception):
    """Stands for a kill between two batches of a likelihood evaluation or a sampling run."""


def _run_killed_after(monkeypatch, journal_class, batches: int, argv) -> None:
    """Run main with argv, "killed" right after the journal saved its `batches`-th batch."""
    record = journal_class.record

    def record_then_die(self, index, *args, **kwargs):
        record(self, index, *args, **kwargs)
        if len(self.done) == batches:
            raise _Killed

    monkeypatch.setattr(journal_class, "record", record_then_die)
    with pytest.raises(_Killed):
        main.main(argv)
    monkeypatch.setattr(journal_class, "record", record)


def _likelihood_report(workdir) -> dict:
    (path,) = glob.glob(os.path.join(workdir, "likelihood", "likelihood_test_h*.json"))
    return json.loads(open(path).read())


def test_a_killed_likelihood_evaluation_resumes_from_its_saved_batches(tmp_path, monkeypatch, capsys):
    """Every finished batch is saved (likelihood_*.json.partial); the same command after a kill computes only the
    missing batches and reports exactly what an uninterrupted run reports; the journal is removed at the end."""
    from evaluation import batch_journal, likelihood_runner

    argv = [*LIKELIHOOD, "--num_batches", "3"]
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    for workdir in (whole, killed):
        _write_checkpoint(workdir, seed=1)
    assert main.main([*argv, "--workdir", whole]) == 0
    reference = _likelihood_report(whole)
    assert not glob.glob(os.path.join(whole, "likelihood", "*.partial"))

    _run_killed_after(monkeypatch, batch_journal.BatchJournal, 2, [*argv, "--workdir", killed])
    (journal,) = glob.glob(os.path.join(killed, "likelihood", "likelihood_test_h*.json.partial"))
    assert sorted(json.loads(open(journal).read())["batches"]) == ["0", "1"]
    assert not glob.glob(os.path.join(killed, "likelihood", "*.json"))

    computed = []
    log_likelihood = likelihood_runner.log_likelihood
    monkeypatch.setattr(likelihood_runner, "log_likelihood",
                        lambda *a, **k: computed.append(1) or log_likelihood(*a, **k))
    capsys.readouterr()
    assert main.main([*argv, "--workdir", killed]) == 0
    assert "2 of 3 batches done" in capsys.readouterr().out and len(computed) == 1
    resumed = _likelihood_report(killed)
    for key in ("bits_per_dim", "bits_per_dim_stderr", "nats_per_dim", "num_samples", "mean_nfe", "total_nfe"):
        assert resumed[key] == reference[key], key
    assert not os.path.exists(journal)


def test_a_likelihood_journal_of_another_checkpoint_is_replaced_and_a_damaged_one_refused(tmp_path, monkeypatch,
                                                                                           capsys):
    """Batches saved for another checkpoint step are not reused (a note says so); an unreadable journal or one
    whose batches do not fit is refused in one line before any work."""
    from evaluation import batch_journal

    argv = [*LIKELIHOOD, "--num_batches", "2"]
    workdir, fresh = str(tmp_path / "run"), str(tmp_path / "fresh")
    _write_checkpoint(workdir, seed=1)
    _run_killed_after(monkeypatch, batch_journal.BatchJournal, 1, [*argv, "--workdir", workdir])
    (journal,) = glob.glob(os.path.join(workdir, "likelihood", "*.partial"))
    saved = open(journal).read()

    _write_checkpoint(workdir, seed=2)  # trained further: step 2, other weights
    _write_checkpoint(fresh, seed=2)
    capsys.readouterr()
    assert main.main([*argv, "--workdir", workdir]) == 0
    assert "checkpoint step 1; now step 2" in capsys.readouterr().out
    assert main.main([*argv, "--workdir", fresh]) == 0
    assert _likelihood_report(workdir)["bits_per_dim"] == _likelihood_report(fresh)["bits_per_dim"]

    from training.checkpoint import stored_digest

    base = json.loads(saved)
    base["header"].update(step=2, weights=stored_digest(checkpoint_path(workdir)))  # made for the new weights
    entry, no_reference = json.loads(json.dumps(base)), json.loads(json.dumps(base))
    entry["batches"]["0"]["nats"] = [0.0]  # 4 points expected
    del no_reference["batches"]["0"]["reference"]  # ring2d is an analytic mixture: its exact log p is kept too
    for text, reason in [("{not json", "Expecting property name"), (json.dumps(entry), "does not hold 4 values"),
                         (json.dumps(no_reference), "under 'reference'")]:
        open(journal, "w").write(text)
        capsys.readouterr()
        assert main.main([*argv, "--workdir", workdir]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "cannot resume from" in err and reason in err, err
        assert "delete the file to start over" in err


def test_a_killed_sampling_run_resumes_from_its_saved_batches(tmp_path, monkeypatch, capsys):
    """`--mode sample` saves every finished batch in samples/<stem>.partial/; after a kill the same command draws
    only the missing batches, writes exactly the samples of an uninterrupted run and removes the folder. A batch
    file that does not fit is refused in one line."""
    import solvers
    from evaluation import batch_journal

    argv = [*SAMPLE, "--num_samples", "12", "--config.sampling.batch_size=4"]
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    for workdir in (whole, killed):
        _write_checkpoint(workdir, seed=1)
    assert main.main([*argv, "--workdir", whole]) == 0
    (reference,) = glob.glob(os.path.join(whole, "samples", "*.npz"))
    assert not glob.glob(os.path.join(whole, "samples", "*.partial"))

    _run_killed_after(monkeypatch, batch_journal.ArrayJournal, 2, [*argv, "--workdir", killed])
    (folder,) = glob.glob(os.path.join(killed, "samples", "*.partial"))
    assert sorted(os.listdir(folder)) == ["batch_0.npz", "batch_1.npz", "journal.json"]
    assert not glob.glob(os.path.join(killed, "samples", "*.npz"))

    saved_seconds = sum(float(np.load(os.path.join(folder, f"batch_{i}.npz"))["seconds"]) for i in (0, 1))
    calls = []
    real_sample = solvers.sample
    monkeypatch.setattr(solvers, "sample", lambda *a, **k: calls.append(1) or real_sample(*a, **k))
    capsys.readouterr()
    assert main.main([*argv, "--workdir", killed]) == 0
    assert "2 of 3 batches done" in capsys.readouterr().out and len(calls) == 1
    (resumed,) = glob.glob(os.path.join(killed, "samples", "*.npz"))
    np.testing.assert_array_equal(np.load(resumed)["samples"], np.load(reference)["samples"])
    assert not os.path.exists(folder)
    facts = json.loads(open(resumed[:-len(".npz")] + ".json").read())
    assert facts["seconds"] >= round(saved_seconds, 3) > 0  # the time of the reused batches is counted

    # a damaged batch file: one line before any sampling (batch 0 is still to draw), the folder left to delete
    _run_killed_after(monkeypatch, batch_journal.ArrayJournal, 2, [*argv, "--workdir", killed])
    index = json.loads(open(os.path.join(folder, "journal.json")).read())
    open(os.path.join(folder, "journal.json"), "w").write(json.dumps({**index, "done": [1]}))
    calls.clear()
    batch = os.path.join(folder, "batch_1.npz")
    for damage, reason in [(lambda: np.savez(batch, samples=np.zeros((3, 2), np.float32), nfe=np.array(4)),
                            "does not hold float32 samples"),
                           (lambda: open(batch, "r+b").truncate(100), "BadZipFile")]:
        damage()
        capsys.readouterr()
        assert main.main([*argv, "--workdir", killed]) == 2 and not calls
        err = capsys.readouterr().err
        assert "Traceback" not in err and "cannot resume from" in err and reason in err, err


def test_sigkill_in_the_third_batch_then_resume_gives_the_uninterrupted_results(tmp_path):
    """A real SIGKILL while the third batch is computed (sampling and likelihood, 4 batches each): the two saved
    batches are reused and the results equal an uninterrupted run's."""
    base = str(tmp_path / "base")
    _write_checkpoint(base, seed=1)
    sample_argv = [*SAMPLE, "--num_samples", "16", "--config.sampling.batch_size=4"]
    likelihood_argv = [*LIKELIHOOD, "--num_batches", "4"]
    results = _kill_runs(base, tmp_path, [("sample", sample_argv, "batch:3"), ("likelihood", likelihood_argv,
                                                                               "batch:3")])
    whole = str(tmp_path / "whole")
    shutil.copytree(base, whole)
    assert main.main([*sample_argv, "--workdir", whole]) == 0 and main.main([*likelihood_argv, "--workdir", whole]) == 0
    for name, (workdir, rc) in results.items():
        assert rc == -9, f"{name}: not killed (exit {rc})"
        sub = "samples" if name == "sample" else "likelihood"
        (journal,) = glob.glob(os.path.join(workdir, sub, "*.partial"))
        done = (sorted(n for n in os.listdir(journal) if n.startswith("batch_")) if name == "sample"
                else sorted(json.loads(open(journal).read())["batches"]))
        assert done == (["batch_0.npz", "batch_1.npz"] if name == "sample" else ["0", "1"]), done
        assert main.main([*(sample_argv if name == "sample" else likelihood_argv), "--workdir", workdir]) == 0
        assert not os.path.exists(journal)
    (resumed,) = glob.glob(os.path.join(results["sample"][0], "samples", "*.npz"))
    (reference,) = glob.glob(os.path.join(whole, "samples", "*.npz"))
    np.testing.assert_array_equal(np.load(resumed)["samples"], np.load(reference)["samples"])
    assert _likelihood_report(results["likelihood"][0])["bits_per_dim"] == _likelihood_report(whole)["bits_per_dim"]


def test_stored_digest_names_the_weights_of_a_checkpoint(tmp_path):
    """The journals tell checkpoints apart by the SHA-256 in the checkpoint's first line (None without one)."""
    import hashlib

    from training.checkpoint import stored_digest

    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    _write_checkpoint(first, seed=1)
    _write_checkpoint(second, seed=2)
    data = open(checkpoint_path(first), "rb").read()
    payload = data[data.index(b"\n") + 1:]
    assert stored_digest(checkpoint_path(first)) == hashlib.sha256(payload).hexdigest()
    assert stored_digest(checkpoint_path(first)) != stored_digest(checkpoint_path(second))
    (tmp_path / "legacy.pt").write_bytes(payload)  # a file from before checksums
    assert stored_digest(str(tmp_path / "legacy.pt")) is None and stored_digest(str(tmp_path / "none.pt")) is None


def test_sample_batches_saved_for_other_weights_are_not_reused(tmp_path, capsys, monkeypatch):
    from evaluation import batch_journal

    argv = [*SAMPLE, "--num_samples", "8", "--config.sampling.batch_size=4"]
    workdir, fresh = str(tmp_path / "run"), str(tmp_path / "fresh")
    _write_checkpoint(workdir, seed=1)
    _run_killed_after(monkeypatch, batch_journal.ArrayJournal, 1, [*argv, "--workdir", workdir])
    _write_checkpoint(workdir, seed=2)
    _write_checkpoint(fresh, seed=2)
    capsys.readouterr()
    assert main.main([*argv, "--workdir", workdir]) == 0
    assert "checkpoint step 1; now step 2" in capsys.readouterr().out
    assert main.main([*argv, "--workdir", fresh]) == 0
    (resumed,), (reference,) = (glob.glob(os.path.join(w, "samples", "*.npz")) for w in (workdir, fresh))
    np.testing.assert_array_equal(np.load(resumed)["samples"], np.load(reference)["samples"])


def test_hostile_journal_contents_are_refused_in_one_line_and_nan_results_resume(tmp_path, monkeypatch, capsys):
    """Journal values of the wrong kind (booleans, negative counts, strings, overflowing or deeply nested JSON)
    are refused in one line; NaN bits/dim of a diverged batch are a result and resume as such."""
    from evaluation import batch_journal

    argv = [*LIKELIHOOD, "--num_batches", "2"]
    workdir = str(tmp_path / "run")
    _write_checkpoint(workdir, seed=1)
    _run_killed_after(monkeypatch, batch_journal.BatchJournal, 1, [*argv, "--workdir", workdir])
    (journal,) = glob.glob(os.path.join(workdir, "likelihood", "*.partial"))
    good = json.loads(open(journal).read())

    def with_batch(**changes):
        changed = json.loads(json.dumps(good))
        changed["batches"]["0"].update(changes)
        return json.dumps(changed)

    cases = [(with_batch(nfe=True), "'nfe' is not a finite non-negative number"),
             (with_batch(seconds=-1.0), "'seconds' is not a finite non-negative number"),
             (with_batch(nats=["1.0"] * 4), "does not hold 4 values under 'nats'"),
             ('{"header": ' + "[" * 100000 + "]" * 100000 + "}", "cannot resume from")]
    for text, reason in cases:
        open(journal, "w").write(text)
        capsys.readouterr()
        assert main.main([*argv, "--workdir", workdir]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "cannot resume from" in err and reason in err, err
    open(journal, "w").write(with_batch(nats=[float("nan")] * 4))
    assert main.main([*argv, "--workdir", workdir]) == 0
    assert math.isnan(_likelihood_report(workdir)["nats_per_dim"])

    folder = os.path.join(workdir, "samples", "x.partial")
    os.makedirs(folder)
    open(os.path.join(folder, "journal.json"), "w").write('{"header": {}, "done": [Infinity]}')
    with pytest.raises(UserError, match="cannot resume from"):
        batch_journal.ArrayJournal.open(folder, {})
    # a batch file replaced by a bare .npy array, or an npz whose deflate stream is damaged (once: TypeError and
    # zlib.error tracebacks)
    journal = batch_journal.ArrayJournal(folder, {"k": 1})
    journal.record(0, x=np.zeros(3))
    batch = os.path.join(folder, "batch_0.npz")
    with open(batch, "wb") as handle:
        np.save(handle, np.zeros(3))
    with pytest.raises(UserError, match="cannot resume from .*batch_0.npz: .*delete") as error:
        journal.load(0)
    assert "\n" not in str(error.value)
    np.savez_compressed(batch, x=np.arange(10000.0))
    data = bytearray(open(batch, "rb").read())
    data[200:260] = bytes(60)  # inside the compressed stream (the local header is 30 bytes + the name)
    open(batch, "wb").write(bytes(data))
    with pytest.raises(UserError, match="cannot resume from .*batch_0.npz"):
        journal.load(0)


def test_no_journal_when_the_checkpoint_is_replaced_while_it_loads(tmp_path, monkeypatch, capsys):
    """A trainer writing a new checkpoint while sample / likelihood load it: which weights were loaded is not
    known, so their batches are not saved for a resume (the run itself completes)."""
    import evaluation.run
    from evaluation import batch_journal, sample_runner

    workdir = str(tmp_path / "run")
    _write_checkpoint(workdir, seed=1)
    saved = []
    for journal_class in (batch_journal.ArrayJournal, batch_journal.BatchJournal):
        monkeypatch.setattr(journal_class, "record", lambda self, *args, **kwargs: saved.append(args))

    def then_replace(load, seed):
        def loading(*args, **kwargs):
            loaded = load(*args, **kwargs)
            _write_checkpoint(workdir, seed=seed)  # the trainer's next snapshot lands meanwhile
            return loaded
        return loading

    note = "was replaced while it loaded (a training run?): this run's batches are not saved for a resume"
    monkeypatch.setattr(sample_runner, "load_score_fn", then_replace(sample_runner.load_score_fn, 2))
    assert main.main([*SAMPLE, "--workdir", workdir]) == 0 and not saved
    assert note in capsys.readouterr().out  # said, not silent
    monkeypatch.setattr(evaluation.run, "load_run", then_replace(evaluation.run.load_run, 3))
    assert main.main([*LIKELIHOOD, "--workdir", workdir]) == 0 and not saved
    assert note in capsys.readouterr().out


def test_a_second_training_of_the_same_workdir_is_refused(tmp_path, capsys):
    """Two trainings used to run at once and overwrite each other's checkpoints (config.json of one, weights of
    the other: the run no longer loaded). The folder is locked while one trains; no lock file is left behind."""
    import atomic_io
    from test_training import tiny_config
    from training.trainer import train

    config = tiny_config(n_iters=2)
    with atomic_io.folder_lock(str(tmp_path), "training run"):
        with pytest.raises(UserError, match="is in use by another training run"):
            train(config, str(tmp_path))
    assert os.listdir(tmp_path) == []
    assert train(config, str(tmp_path)).step == 2  # free again


def test_temp_files_of_another_host_are_kept_unless_old_and_journals_finish_twice(tmp_path):
    """On a shared file system a pid says nothing about another host's writer: its temp file was deleted under
    it. Two identical commands finishing the same sample journal used to raise FileNotFoundError."""
    import time

    import atomic_io
    from evaluation.batch_journal import ArrayJournal

    other = tmp_path / ".tmp_999999999_h0123abcd_k3x9q0a1.npz"  # another host's live writer (a pid unknown here)
    old_other = tmp_path / ".tmp_999999999_h0123abcd_zzzz0000.npz"
    dead_here = tmp_path / f".tmp_999999999_h{atomic_io.HOST_TAG}_abcd1234.npz"
    for path in (other, old_other, dead_here):
        path.write_bytes(b"partial")
    os.utime(old_other, (time.time() - 2 * atomic_io.STALE_ELSEWHERE_S,) * 2)
    removed = atomic_io.remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted([str(old_other), str(dead_here)]) and other.exists()
    assert atomic_io.temp_prefix() == f".tmp_{os.getpid()}_h{atomic_io.HOST_TAG}_"

    folder = tmp_path / "x.partial"
    journal = ArrayJournal(str(folder), {"k": 1})
    journal.record(0, x=np.zeros(3))
    live = folder / ".tmp_999999999_h0123abcd_live0000.npz"  # the other command, still writing
    live.write_bytes(b"partial")
    journal.finish()
    assert live.exists() and not (folder / "batch_0.npz").exists()
    journal.finish()  # the second finish of the same journal: nothing left to remove, no error
    live.unlink()
    journal.finish()
    assert not folder.exists()
