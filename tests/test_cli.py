"""The fxopt command: passes, inspect, bisect, optimize, its help, warnings and errors."""
import argparse
import os
import subprocess
import sys

import pytest

from fxopt import cli
from fxopt.cli import main

ZOO = os.path.join(os.path.dirname(__file__), "zoo.py")


def test_passes_lists_targets_and_passes(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "cpu-fp32" in out and "fold_batchnorm" in out and "fuse_epilogues" in out


@pytest.mark.slow
def test_inspect_prints_table_and_dumps(capsys, tmp_path):
    assert main(["inspect", f"{ZOO}:cnn_bn_residual", "--print-ir-after", "fold_batchnorm",
                 "--dump-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "// IR after fold_batchnorm" in out and "folded=" in out
    assert os.path.exists(tmp_path / "005_fold_batchnorm.txt")


def test_bisect_clean_pipeline_exits_zero(capsys):
    assert main(["bisect", f"{ZOO}:mlp", "--tol", "1e-4"]) == 0
    assert "no pass drifted" in capsys.readouterr().out


def test_bad_model_spec_is_a_clear_error(capsys):
    assert main(["inspect", "no_colon_here"]) == 2
    assert "must be module.path:factory" in capsys.readouterr().err
    assert main(["inspect", f"{ZOO}:nope"]) == 2
    assert "has no attribute 'nope'" in capsys.readouterr().err
    assert main(["inspect", f"{ZOO}:mlp", "--target", "gpu"]) == 2
    assert "unknown target 'gpu'" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "fxopt.cli", "passes"], capture_output=True, text=True,
                         check=True).stdout
    assert "targets:" in out


def test_optimize_saves_and_report_reads_back(capsys, tmp_path):
    import torch

    import fxopt
    from zoo import mlp

    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(16, 32), calib)
    out = tmp_path / "mlp.fxopt"
    assert main(["optimize", f"{ZOO}:mlp", "--calib", str(calib), "--calib-batch", "4", "-o", str(out)]) == 0
    assert "saved to" in capsys.readouterr().out
    model, example, other = mlp()
    loaded = fxopt.load(str(out))
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(loaded(*other).flatten(), model(*other).flatten(), dim=0)
    assert cos > 0.99
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "quantize_int8" in text and "per-row dynamic activations" in text
    assert main(["optimize", f"{ZOO}:mlp", "--calib", str(tmp_path / "missing.pt"), "-o", str(out)]) == 2
    assert "no such calibration file" in capsys.readouterr().err


def test_profile_a_factory_and_a_saved_model(capsys, tmp_path):
    import torch

    import fxopt
    from zoo import mlp

    assert main(["profile", f"{ZOO}:mlp", "--repeats", "2", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "linear_int8" in out and "outside steps" in out and "faster steps not shown" in out
    model, example, other = mlp()
    path, inputs = tmp_path / "mlp.fxopt", tmp_path / "inputs.pt"
    fxopt.save(fxopt.optimize(model, example, report_layers=False, latency_repeats=0), path)
    try:
        main(["profile", str(path)])
        raise AssertionError("a saved model without --inputs must be refused")
    except SystemExit as e:
        assert "needs --inputs" in str(e)
    torch.save(other, inputs)
    assert main(["profile", str(path), "--inputs", str(inputs), "--repeats", "2", "--top", "0"]) == 0
    assert "kernel steps" in capsys.readouterr().out


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_every_option_has_help_and_names_its_default():
    parser = cli._parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command, sub in commands.items():
        for action in sub._actions:
            where = f"fxopt {command} {'/'.join(action.option_strings) or action.dest}"
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{where} has no help"
            takes_value = action.option_strings and action.nargs != 0 and not action.required
            if takes_value:
                assert "default" in action.help, f"{where}: the help must state the default"


def test_help_shows_defaults_and_the_calibration_format(capsys):
    assert "(default: cpu-fp32)" in _help(capsys, "inspect")
    assert "(default: cpu-fp32)" in _help(capsys, "bisect")
    text = _help(capsys, "optimize")
    assert "(default: cpu-int8)" in text and "--calib-batch N" in text and "(default: 8)" in text
    assert 'torch.save([x1, x2, x3], "batches.pt")' in text and "module:function" in text


def test_version(capsys):
    import numba
    import torch

    import fxopt
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"fxopt {fxopt.__version__} (torch {torch.__version__}, numba {numba.__version__})\n"


def test_bench_help_describes_each_kind_and_passes_its_own_help_on(capsys):
    text = _help(capsys, "bench")
    for kind, quick in (("gemm", "--quick"), ("prune", "--layers 2"), ("models", "--small")):
        paragraph = text[text.index(f"  {kind}  "):]
        assert quick in paragraph and "minute" in paragraph, kind
    assert "--out PATH" in text
    for kind in ("gemm", "models"):
        own = _help(capsys, "bench", kind)
        assert f"fxopt bench {kind}" in own and "--out PATH" in own and "(default: write nothing)" in own
    assert "(default: 0,0.3,0.5)" in _help(capsys, "bench", "prune")


def _readme_recipe() -> str:
    """The calibration recipe line of README.md."""
    with open(os.path.join(os.path.dirname(ZOO), os.pardir, "README.md")) as f:
        lines = [line.strip() for line in f if line.startswith("    torch.save(")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.slow
def test_readme_calibration_recipe_works_through_the_cli(capsys, tmp_path, monkeypatch):
    import itertools

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    monkeypatch.chdir(tmp_path)
    images = torch.randn(80, 3, 32, 32)
    loader = DataLoader(TensorDataset(images, torch.zeros(80, dtype=torch.long)), batch_size=8)
    exec(_readme_recipe(), {"torch": torch, "itertools": itertools, "loader": loader})
    saved = torch.load("batches.pt", weights_only=True)
    assert len(saved) == 8 and torch.equal(saved[0], images[:8])
    out = tmp_path / "cnn.fxopt"
    assert main(["optimize", f"{ZOO}:cnn_bn_residual", "--calib", "batches.pt", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "observed=" in captured.out and "saved to" in captured.out
    assert "calibrated on the example inputs only" not in captured.err


@pytest.mark.slow
def test_missing_calibration_warning_names_the_cli_flag(capsys, tmp_path):
    out = tmp_path / "cnn.fxopt"
    assert main(["optimize", f"{ZOO}:cnn_bn_residual", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "fxopt: warning: no --calib was given" in err and "calibration_data=" not in err
    # a command without --calib says so rather than naming a flag it does not take
    assert main(["inspect", f"{ZOO}:cnn_bn_residual", "--target", "cpu-int8"]) == 0
    err = capsys.readouterr().err
    assert "`fxopt inspect` takes no calibration data" in err and "calibration_data=" not in err


@pytest.mark.slow
def test_missing_calibration_warning_names_the_python_argument():
    import fxopt
    from zoo import cnn_bn_residual

    model, example, _ = cnn_bn_residual()
    with pytest.warns(fxopt.NoCalibrationWarning, match=r"Pass calibration_data= \(an iterable"):
        fxopt.optimize(model, example, report_layers=False, latency_repeats=0)



def test_bad_input_shape_and_stray_bench_options_are_clear_errors(capsys, tmp_path):
    factory = tmp_path / "bare.py"
    factory.write_text("import torch\n\ndef model():\n    return torch.nn.Linear(4, 2)\n")
    assert main(["inspect", f"{factory}:model"]) == 2
    assert "give --input-shape" in capsys.readouterr().err
    assert main(["inspect", f"{factory}:model", "--input-shape", "2,x"]) == 2
    assert "--input-shape '2,x': give positive integers separated by commas" in capsys.readouterr().err
    assert main(["inspect", f"{factory}:model", "--input-shape", "2,4"]) == 0
    with pytest.raises(SystemExit) as e:
        main(["bench", "--quick", "gemm"])
    assert e.value.code == 2 and "unrecognized arguments: --quick" in capsys.readouterr().err
