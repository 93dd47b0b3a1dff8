"""Bad input values are never answered with a silently wrong number: NaN and inf reach the
outputs as in eager, huge values do not collapse to zero, out-of-range indices raise like
eager, and a wrong dtype, rank or device is a clear error naming the input."""
import functools
import warnings

import numpy as np
import pytest
import torch

import fxopt
from fxopt.core.ir import node_counts
from fxopt.examples import DigitsCNN, DigitsMLP, digits, train
from fxopt.kernels import reference as R
from fxopt.kernels.api import quantize_rows_f32_u8, use_isa
from fxopt.kernels.dispatch import available_isas


@functools.lru_cache(maxsize=None)
def trained(kind):
    """(eager digits model, its cpu-int8 optimization, test images): trained, so outputs
    depend on the input (checked below)."""
    data = digits()
    model = train({"mlp": DigitsMLP, "cnn": DigitsCNN}[kind](), data, epochs=3).eval()
    x = data.x_test[:16]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = fxopt.optimize(model, (x,), target="cpu-int8", calibration_data=[(data.x_train[:128],)],
                              latency_repeats=0, report_layers=False, drift=False)
    return model, fast, x


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_outputs_depend_on_the_input(kind):
    model, fast, x = trained(kind)
    with torch.no_grad():
        assert not torch.allclose(model(x[:1]), model(x[1:2]), atol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_inputs_reach_the_outputs_as_in_eager(kind, bad, tmp_path):
    model, fast, x = trained(kind)
    x = x.clone()
    x[1, 0, 3, 4] = bad
    x[5, 0, 0, 0] = bad
    with torch.no_grad():
        eager, ours = model(x), fast(x)
    nonfinite = ~torch.isfinite(eager)
    assert nonfinite[[1, 5]].all() and torch.isfinite(eager[[0, 2, 3, 4]]).all()
    assert torch.equal(~torch.isfinite(ours), nonfinite)
    fxopt.save(fast, tmp_path / "m.fxopt")
    assert torch.equal(~torch.isfinite(fxopt.load(tmp_path / "m.fxopt")(x)), nonfinite)
    # the finite samples keep their answers
    assert torch.equal(ours[[0, 2]], fast(x[[0, 2]]))


def test_huge_inputs_are_not_answered_as_zero():
    model, fast, x = trained("mlp")
    big = x[:4] * 1e37            # |x| up to 1e37: the row's max - min overflowed float32
    with torch.no_grad():
        eager, ours, zero = model(big), fast(big), fast(torch.zeros_like(big))
    assert torch.isfinite(ours).all()
    cos = torch.nn.functional.cosine_similarity(ours * 1e-37, eager * 1e-37, dim=1)   # norms overflow unscaled
    assert (cos > 0.99).all(), cos
    assert ((ours - zero).abs().amax(dim=1) > 1e30).all()


@pytest.mark.parametrize("isa", available_isas())
def test_row_quantization_of_huge_rows_matches_the_reference(isa):
    x = np.array([[3e38, -3e38, 1.0, 0.0], [1e38, -2e38, 5e37, -1.0], [1.0, 2.0, -3.0, 0.5]], np.float32)
    with use_isa(isa):
        q, scales, zps = quantize_rows_f32_u8(x)
    rq, rs, rz = R.quantize_rows_f32_u8(x)
    assert np.isfinite(scales).all() and np.array_equal(scales, rs) and np.array_equal(zps, rz)
    assert np.array_equal(q[:, :4], rq)


@pytest.mark.slow
def test_embedding_indices_out_of_range_raise_like_eager():
    from zoo import ZOO
    model, example, _ = ZOO["bert"]()
    fast = fxopt.optimize(model, example, target="cpu-int8", calibration_data=[example],
                          latency_repeats=0, report_layers=False, drift=False)
    assert node_counts(fast)["fxopt.embedding_int8"] == 3
    for bad in (-1, 100):
        ids = dict(example, input_ids=example["input_ids"].clone())
        ids["input_ids"][0, 0] = bad
        with pytest.raises(IndexError):
            model(**ids)
        with pytest.raises(IndexError, match=r"index out of range in self: embedding indices must be in \[0, 100\)"):
            fast(**ids)
    as_int32 = dict(example, input_ids=example["input_ids"].to(torch.int32))
    with pytest.raises(TypeError, match="input 'input_ids' must be int64 .* got int32"):
        fast(**as_int32)


@pytest.mark.parametrize("where", ["in memory", "loaded"])
def test_wrong_dtype_rank_or_device_is_a_clear_error(where, tmp_path):
    _, fast, x = trained("mlp")
    if where == "loaded":
        fxopt.save(fast, tmp_path / "m.fxopt")
        fast = fxopt.load(tmp_path / "m.fxopt")
    with pytest.raises(TypeError, match=r"input 'x' must be float32 .* got float64"):
        fast(x.double())
    with pytest.raises(TypeError, match=r"input 'x' must be float32 .* got int64"):
        fast(x.long())
    with pytest.raises(ValueError, match=r"input 'x' must have 4 dims \[\*, 1, 8, 8\]"):
        fast(x[0])
    with pytest.raises(ValueError, match=r"input 'x' is on meta; fxopt models run on the CPU"):
        fast(x.to("meta"))
    assert torch.equal(fast(x), trained("mlp")[1](x))


@pytest.mark.slow
def test_the_pass_skips_models_without_float_batched_inputs():
    from zoo import ZOO
    model, example, _ = ZOO["bert"]()
    fast = fxopt.optimize(model, example, target="cpu-int8", calibration_data=[example],
                          latency_repeats=0, report_layers=False, drift=False)
    record = next(r for r in fast.fxopt_report.records if r.name == "propagate_nonfinite")
    assert record.stats == {"skipped": "no float input with a dynamic batch dim"} and not record.changed
    assert not any("poison" in op for op in node_counts(fast))
