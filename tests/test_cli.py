"""Command line: configs by name or path, typed overrides, and one-line errors with the valid choices."""
import os
import subprocess
import sys

import pytest

import configs
import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(capsys, *argv):
    code = main.main(list(argv))
    return code, capsys.readouterr().err


def test_unknown_config(capsys):
    code, err = run_main(capsys, "--mode", "train", "--config", "nope")
    assert code == 2
    assert "unknown config 'nope'" in err and "vp_toy" in err and len(err.strip().splitlines()) == 1


def test_unknown_mode(capsys):
    code, err = run_main(capsys, "--mode", "dance", "--config", "vp_toy")
    assert code == 2 and "unknown mode 'dance'" in err and "train, sample, likelihood, eval" in err


def test_unknown_solver(capsys):
    code, err = run_main(capsys, "--mode", "sample", "--config", "vp_toy", "--solver", "magic")
    assert code == 2 and "unknown solver 'magic'" in err and "valid:" in err


@pytest.mark.parametrize("override, message", [
    ("--config.training.batch_size=abc", "expected a number"),
    ("--config.training.batch_size=1.5", "expected an integer"),
    ("--config.training.nope=1", "unknown config key 'training.nope'"),
    ("--config.bogus.x=1", "'bogus' not in config"),
    ("--config.training.bf16=maybe", "expected true or false"),
    ("--config.training=3", "names a group"),
])
def test_malformed_overrides(capsys, override, message):
    code, err = run_main(capsys, "--mode", "train", "--config", "vp_toy", override)
    assert code == 2 and message in err, err


def test_override_without_value(capsys):
    code, err = run_main(capsys, "--mode", "train", "--config", "vp_toy", "--config.training.batch_size")
    assert code == 2 and "malformed override" in err


def test_non_positive_nfe(capsys):
    code, err = run_main(capsys, "--mode", "sample", "--config", "vp_toy", "--nfe", "0")
    assert code == 2 and "--nfe must be positive" in err


def test_unrecognized_flag(capsys):
    code, err = run_main(capsys, "--mode", "train", "--config", "vp_toy", "--bogus")
    assert code == 2 and "unrecognized arguments: --bogus" in err


def test_typed_overrides_and_config_file(tmp_path):
    config = configs.get_config("vp_toy")
    configs.apply_overrides(config, ["training.batch_size=64", "sde.beta_max=10", "training.bf16=false",
                                     "data.dataset=grid2d"])
    assert config.training.batch_size == 64 and isinstance(config.training.batch_size, int)
    assert config.sde.beta_max == 10.0 and isinstance(config.sde.beta_max, float)
    assert config.training.bf16 is False and config.data.dataset == "grid2d"
    path = tmp_path / "my_config.py"
    path.write_text("from configs.vp_toy import get_config as base\n\n"
                    "def get_config():\n    c = base()\n    c.seed = 7\n    return c\n")
    assert configs.get_config(str(path)).seed == 7
    with pytest.raises(configs.ConfigError, match="does not exist"):
        configs.get_config(str(tmp_path / "missing.py"))


def test_every_named_config_loads():
    names = configs.available_configs()
    assert {"vp_toy", "subvp_toy", "ve_toy"} <= set(names)
    for name in names:
        config = configs.get_config(name)
        assert {"data", "sde", "model", "training", "sampling", "likelihood", "seed"} <= set(config.keys())


def test_process_exit_code_and_single_line():
    proc = subprocess.run([sys.executable, "main.py", "--mode", "train", "--config", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown config 'nope'")
    assert len(proc.stderr.strip().splitlines()) == 1


def _compare_solvers_script():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "compare_solvers.py")
    spec = importlib.util.spec_from_file_location("compare_solvers_cli", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize("argv,message", [
    (["--nfe", "abc"], "--nfe must be comma-separated positive integers, got 'abc'"),
    (["--nfe", "0"], "--nfe must be comma-separated positive integers"),
    (["--nfe", "10,-5"], "--nfe must be comma-separated positive integers"),
    (["--num_samples", "0"], "--num_samples must be at least 2"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--solvers", "em,nosuch"], "unknown solver 'nosuch'"),
    (["--solvers", "ald"], "no solver setting ran: solver 'ald' is not valid for VPSDE"),  # every setting refused under VP
], ids=["nfe_text", "nfe_zero", "nfe_negative", "num_samples_zero", "threads_zero", "unknown_solver", "none_ran"])
def test_compare_solvers_refuses_bad_arguments_in_one_line(tmp_path, argv, message):
    """Once: tracebacks from int(), matplotlib, torch.multinomial or set_num_threads, and a csv + md without png."""
    from errors import UserError

    script = _compare_solvers_script()
    out = str(tmp_path / "cmp")
    with pytest.raises(UserError, match=message) as error:
        script.main(["--target", "ring2d", "--nfe", "2", "--num_samples", "20", "--out", out, *argv])
    assert "\n" not in str(error.value) and not os.listdir(tmp_path)


def test_compare_solvers_never_replaces_an_earlier_comparison_unless_told(tmp_path, monkeypatch):
    """The default --out is in the run's folder (a workdir) or solver_comparison_TARGET_SDE here, never docs/;
    a second comparison to the same prefix is refused without --force (it used to replace the first silently)."""
    from errors import UserError

    script = _compare_solvers_script()
    monkeypatch.chdir(tmp_path)
    argv = ["--target", "ring2d", "--solvers", "em", "--nfe", "2", "--num_samples", "20"]
    assert script.main(argv) == 0
    written = sorted(os.listdir(tmp_path))
    assert written == [f"solver_comparison_ring2d_vp{ext}" for ext in (".csv", ".md", ".png")]
    before = open(tmp_path / written[0]).read()
    with pytest.raises(UserError, match="solver_comparison_ring2d_vp.csv exists .*--force"):
        script.main([*argv, "--seed", "5"])
    assert open(tmp_path / written[0]).read() == before
    assert script.main([*argv, "--seed", "5", "--force"]) == 0
    assert open(tmp_path / written[0]).read() != before


def test_config_paths_that_are_not_configs(tmp_path, capsys):
    """A folder, or a file that is neither .py nor .json, as --config: one line each (once: a misleading
    "does not exist" and an AttributeError traceback)."""
    (tmp_path / "train.log").write_text("not a config")
    for path, message in ((str(tmp_path), "is a folder"), (str(tmp_path / "train.log"), "is neither a .py file")):
        assert main.main(["--mode", "sample", "--config", path, "--workdir", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("script,argv,message", [
    ("adaptive_bias.py", ["--rtol", "abc"], "expected comma-separated tolerances"),
    ("bench_likelihood_ode.py", ["--problems", "ring2d"], "is not MIXTURE:SDE"),
    ("likelihood_grid_floor.py", ["--nfe", "48,50"], "multiples of 4"),
    ("likelihood_field_roughness.py", ["--run", "/nonexistent/run"], "holds no run"),
    ("check_reference_conditioning.py", ["--num_t", "0"], "expected a positive integer"),
    ("bench_likelihood.py", ["--num_images", "0"], "--num_images must be a positive integer"),
])
def test_scripts_refuse_bad_arguments_without_a_traceback(script, argv, message):
    """Each once ended in a traceback (ValueError, AssertionError, an uncaught UserError) with exit code 1."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "scripts", script), *argv], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr
