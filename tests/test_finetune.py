"""Knowledge-distillation recovery of pruned models (fxopt.pruning.finetune)."""
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import zoo  # noqa: E402
from digits import Loader, accuracy, trained_digits_cnn  # noqa: E402

from fxopt.api import prune  # noqa: E402
from fxopt.pruning.finetune import finetune, kd_loss, make_trainable  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_digits_cnn_pruned_half_recovers_within_one_point():
    model, (x_train, _), (x_test, y_test) = trained_digits_cnn(epochs=8)
    base = accuracy(model, x_test, y_test)
    small = prune(model, (x_train[:8],), 0.5, round_to=1)
    report = small.fxopt_prune
    assert all(g.kept * 2 == g.count for g in report.groups)
    assert report.params[1] < 0.3 * report.params[0]
    pruned = accuracy(small, x_test, y_test)
    finetune(small, model, Loader(x_train), epochs=16, lr=5e-3, temperature=4.0, progress=False)
    recovered = accuracy(small, x_test, y_test)
    print(f"digits: base {base:.4f} pruned {pruned:.4f} recovered {recovered:.4f}")
    assert base > 0.95
    assert pruned < base
    assert recovered >= base - 0.01


def test_kd_loss_is_zero_for_equal_logits_and_matches_formula():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    assert float(kd_loss(t, t, 3.0)) == pytest.approx(0.0, abs=1e-6)
    p = torch.softmax(t / 3, -1)
    want = (p * (p.log() - torch.log_softmax(s / 3, -1))).sum(-1).mean() * 9
    torch.testing.assert_close(kd_loss(s, t, 3.0), want)


def test_finetune_trains_pruned_graph_weights_and_matches_teacher_better():
    model, example, _ = zoo.mlp()
    small = prune(model, example, 0.5, round_to=1)
    buffers_before = {n for n, _ in small.named_buffers()}
    x = torch.randn(64, 32)
    data = [(x[i:i + 16],) for i in range(0, 64, 16)]
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(small(x), model(x))
    finetune(small, model, data, epochs=30, lr=3e-3, progress=False)
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(small(x), model(x))
    assert after < 0.5 * before
    # weights add_weight registered as buffers are trainable parameters now
    params = {n for n, _ in small.named_parameters()}
    assert buffers_before & params


def test_finetune_task_loss_needs_targets_and_uses_them():
    model, example, _ = zoo.mlp()
    small = prune(model, example, 0.5, round_to=1)
    x, y = torch.randn(32, 32), torch.randint(0, 10, (32,))
    with pytest.raises(ValueError, match="needs \\(inputs, target\\) pairs"):
        finetune(small, model, [(x,)], loss="kd+task", progress=False)
    finetune(small, model, [((x,), y)] * 40, loss="task", lr=1e-2, progress=False)
    assert accuracy(small, x, y) > 0.9


def test_make_trainable_keeps_batchnorm_statistics_as_buffers():
    model, example, _ = zoo.cnn_bn_residual()
    small = prune(model, example, 0.5, round_to=1)
    make_trainable(small)
    buffers = dict(small.named_buffers())
    assert any("running_mean" in n for n in buffers)
    assert not any(b.is_floating_point() and "running" not in n and "num_batches" not in n
                   for n, b in buffers.items())


@pytest.mark.slow
def test_feature_distillation_on_bert_hidden_states():
    model, example, _ = zoo.bert()
    small = prune(model, example, 0.5, round_to=1)
    layer = "bert.encoder.layer.0.output"
    finetune(small, model, [example] * 3, epochs=1, features=(layer,), progress=False)
    # the taps are gone afterwards: the graph computes the same as a fresh call
    out = small(**example)
    assert out.logits.shape == model(**example).logits.shape
    assert not any("_record" in str(n.target) for n in small.graph.nodes)
