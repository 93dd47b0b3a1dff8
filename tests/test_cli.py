"""The fxopt command: passes, inspect, bisect, and its errors."""
import os
import subprocess
import sys

import pytest

from fxopt.cli import main

ZOO = os.path.join(os.path.dirname(__file__), "zoo.py")


def test_passes_lists_targets_and_passes(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "cpu-fp32" in out and "fold_batchnorm" in out and "fuse_epilogues" in out


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


def test_missing_calibration_warning_names_the_cli_flag(capsys, tmp_path):
    out = tmp_path / "cnn.fxopt"
    assert main(["optimize", f"{ZOO}:cnn_bn_residual", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "fxopt: warning: no --calib was given" in err and "calibration_data=" not in err
    # a command without --calib says so rather than naming a flag it does not take
    assert main(["inspect", f"{ZOO}:cnn_bn_residual", "--target", "cpu-int8"]) == 0
    err = capsys.readouterr().err
    assert "`fxopt inspect` takes no calibration data" in err and "calibration_data=" not in err


def test_missing_calibration_warning_names_the_python_argument():
    import fxopt
    from zoo import cnn_bn_residual

    model, example, _ = cnn_bn_residual()
    with pytest.warns(fxopt.NoCalibrationWarning, match=r"Pass calibration_data= \(an iterable"):
        fxopt.optimize(model, example, report_layers=False, latency_repeats=0)
