"""Each pass on tiny models, through the pass manager: numerics, IR, stats, negative cases."""
import pytest
import torch
from torch import nn

import fxopt
from fxopt.core import ir, ops
from fxopt.core.printer import format_ir

torch.manual_seed(0)


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


class ConvBN(nn.Module):
    def __init__(self, groups=1, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=groups, bias=bias)
        self.bn = _bn(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class ConvTwoUsers(nn.Module):
    """The conv's output also feeds the add: folding the BN into it would change that add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = _bn(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def _run(model, x, pipeline):
    model.eval()
    fast = fxopt.optimize(model, (x,), target=pipeline)
    with torch.no_grad():
        expected = model(x)
        got = fast(x)
    return fast, expected, got


def _stats(fast, name):
    return fast.fxopt_report.record(name).stats


@pytest.mark.parametrize("groups,bias", [(1, True), (1, False), (2, True), (4, False)])
def test_fold_batchnorm_conv(groups, bias):
    x = torch.randn(2, 4, 6, 6)
    model = ConvBN(groups, bias)
    if groups == 4:  # depthwise-like: 4 input channels, multiplier 2
        model.conv = nn.Conv2d(4, 8, 3, padding=1, groups=4, bias=False)
    fast, expected, got = _run(model, x, "fold_batchnorm")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert _stats(fast, "fold_batchnorm")["folded"] == 1
    assert "batch_norm" not in ir.node_counts(fast)
    # the original weights are untouched (a new folded weight was made)
    assert not torch.equal(fast.get_buffer(_conv_weight_name(fast)), model.conv.weight)


def _conv_weight_name(gm):
    conv = next(n for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target))
    return str(conv.args[1].target)


def test_fold_batchnorm_golden_ir(golden):
    fast, expected, got = _run(ConvBN(), torch.randn(2, 4, 6, 6), "fold_batchnorm")
    golden("fold_batchnorm_conv", format_ir(fast))


def test_fold_batchnorm_linear_bn1d():
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU())
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    fast, expected, got = _run(model, torch.randn(3, 6), "fold_batchnorm")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert _stats(fast, "fold_batchnorm")["folded"] == 1


def test_fold_batchnorm_leaves_shared_producer():
    fast, expected, got = _run(ConvTwoUsers(), torch.randn(2, 4, 5, 5), "fold_batchnorm")
    torch.testing.assert_close(got, expected)
    stats = _stats(fast, "fold_batchnorm")
    assert stats["folded"] == 0 and stats["skipped_shared_producer"] == 1
    assert fast.fxopt_report.record("fold_batchnorm").changed is False
    assert ir.node_counts(fast)["batch_norm"] == 1


def test_remove_identity_drops_dropout_and_clone():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(self.fc(x)).clone() * 2

    fast, expected, got = _run(M(), torch.randn(3, 4), "remove_identity")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert _stats(fast, "remove_identity") == {"dropout": 1, "identity": 1, "zero_pad": 0,
                                               "skipped_training_dropout": 0}
    counts = ir.node_counts(fast)
    assert "dropout" not in counts and "clone" not in counts


class PaddedConvs(nn.Module):
    """TF-style explicit pads before convs: zero (a copy), symmetric (the conv's own
    padding), symmetric on top of the conv's padding, and four that must stay: an
    asymmetric one, a non-zero fill, reflect mode, and one whose value is also added."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=p) for p in (1, 0, 1, 0, 0, 0, 0)])

    def forward(self, x):
        F = nn.functional
        c = self.convs
        y = c[0](F.pad(x, (0, 0, 0, 0)))
        y = c[1](F.pad(y, (1, 1, 1, 1)))
        y = c[2](F.pad(y, (2, 2, 1, 1)))                 # W by 2, H by 1, plus padding=1
        y = c[3](F.pad(y, (0, 1, 0, 1)))                 # stride-2 "same": asymmetric
        y = c[4](F.pad(y, (1, 1, 1, 1), value=0.5))
        y = c[5](F.pad(y, (1, 1, 1, 1), mode="reflect"))
        p = F.pad(y, (1, 1, 1, 1))
        return c[6](p) + p[:, :, 1:-1, 1:-1].sum()


@pytest.mark.slow
def test_fold_padding_and_zero_pads():
    model, x = PaddedConvs(), torch.randn(2, 4, 9, 9)
    fast, expected, got = _run(model, x, "remove_identity,fold_padding")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert _stats(fast, "remove_identity")["zero_pad"] == 1
    assert _stats(fast, "fold_padding") == {"folded": 2, "skipped_asymmetric": 1,
                                            "skipped_not_zero_constant": 2, "skipped_shared_pad": 1,
                                            "skipped_not_2d": 0, "named_padding": 0, "named_padding_kept": 0}
    assert ir.node_counts(fast)["pad"] == 4
    paddings = [ops.conv_parts(n)["padding"] for n in fast.graph.nodes if ops.is_conv2d(n)]
    assert [list(p) for p in paddings[:3]] == [[1, 1], [1, 1], [2, 3]]
    # another batch size (a dynamic dim) still agrees
    x2 = torch.randn(3, 4, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(fast(x2), model(x2), rtol=1e-5, atol=1e-5)


def test_named_padding_becomes_numeric_where_symmetric():
    """padding="same"/"valid" (Hugging Face EfficientNet's depthwise convs) become numbers,
    which the int8 rules and the saved-model opset know; an even kernel's "same" pads one
    more at the end and stays as it is."""
    convs = nn.ModuleList([nn.Conv2d(4, 4, 3, padding="same", groups=4),
                           nn.Conv2d(4, 4, 3, padding="same", dilation=2),
                           nn.Conv2d(4, 4, 3, padding="valid"),
                           nn.Conv2d(4, 4, 2, padding="same")])
    model = nn.Sequential(*convs).eval()
    x = torch.randn(2, 4, 11, 11)
    fast, expected, got = _run(model, x, "fold_padding")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    stats = _stats(fast, "fold_padding")
    assert (stats["named_padding"], stats["named_padding_kept"]) == (3, 1)
    paddings = [ops.conv_parts(n)["padding"] for n in fast.graph.nodes if ops.is_conv2d(n)]
    assert [p if isinstance(p, str) else list(p) for p in paddings] == [[1, 1], [2, 2], [0, 0], "same"]
    with torch.no_grad():
        assert (got - model(torch.randn(2, 4, 11, 11))).abs().max() > 0.1     # the input matters


@pytest.mark.slow
def test_fold_padding_on_mobilenet_v2():
    """Hugging Face MobileNetV2 pads every conv TF-style: zero pads go, the symmetric ones
    fold into the convs, only the stride-2 ones (asymmetric) are left."""
    import zoo
    model, example, other = zoo.ZOO["mobilenet_v2"]()
    fast = fxopt.optimize(model, example, target="remove_identity,fold_padding")
    with torch.no_grad():
        expected, got = model(**other), fast(**other)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=1e-4, atol=1e-4)
    zero, folded = _stats(fast, "remove_identity")["zero_pad"], _stats(fast, "fold_padding")["folded"]
    assert zero > 0 and folded > 0
    left = [n for n in fast.graph.nodes if "pad" in str(n.target)]
    assert left and all(list(n.args[1]) == [0, 1, 0, 1] for n in left)


def test_fold_constants_precomputes_weight_only_subgraph():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 4))
            self.scale = nn.Parameter(torch.rand(5, 1) + 0.5)

        def forward(self, x):
            return x @ (self.w * self.scale).t()

    fast, expected, got = _run(M(), torch.randn(3, 4), "fold_constants")
    # the folded weight is laid out contiguously, so the GEMM may sum in another order
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert _stats(fast, "fold_constants")["folded"] == 1
    counts = ir.node_counts(fast)
    assert "mul" not in counts and "t" not in counts and counts == {"matmul": 1}


def test_fold_constants_skips_growing_expand():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.randn(1, 4))

        def forward(self, x):
            return x + self.b.expand(64, 4)[: x.shape[0]]

    fast, expected, got = _run(M(), torch.randn(3, 4), "fold_constants")
    torch.testing.assert_close(got, expected)
    assert _stats(fast, "fold_constants")["skipped_would_grow"] >= 1


@pytest.mark.parametrize("act,name", [
    (nn.ReLU(), "relu"), (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
    (nn.ReLU6(), "hardtanh[0.0, 6.0]"), (nn.Hardtanh(-2, 3), "hardtanh[-2.0, 3.0]"), (nn.SiLU(), "silu")])
def test_fuse_epilogues_linear_activation(act, name):
    model = nn.Sequential(nn.Linear(8, 16), act, nn.Linear(16, 4))
    fast, expected, got = _run(model, torch.randn(3, 8) * 4, "fuse_epilogues")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    fused = [n for n in fast.graph.nodes if n.op == "call_function"]
    assert [ir.op_name(n) for n in fused] == ["fxopt.linear_act", "fxopt.linear_act"]
    assert fused[0].meta["fxopt_activation"] == name and fused[1].meta["fxopt_activation"] == "none"
    assert _stats(fast, "fuse_epilogues")["with_activation"] == 1


def test_fuse_epilogues_golden_ir(golden):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU6(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 10), nn.GELU())
    fast, expected, got = _run(model, torch.randn(2, 3, 8, 8), "fold_batchnorm,fuse_epilogues")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    golden("fuse_epilogues_conv_linear", format_ir(fast))


def test_fuse_epilogues_activation_with_two_users_stays_separate():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            return torch.relu(y) + y  # y is needed raw: relu cannot go into the epilogue

    fast, expected, got = _run(M(), torch.randn(3, 4), "fuse_epilogues")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert _stats(fast, "fuse_epilogues")["with_activation"] == 0
    assert ir.node_counts(fast)["relu"] == 1


def test_fuse_epilogues_addmm_becomes_linear():
    class Conv1D(nn.Module):  # GPT-2's layout: weight [in, out], addmm(bias, x, weight)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 6))
            self.bias = nn.Parameter(torch.randn(6))

        def forward(self, x):
            size = x.shape[:-1] + (6,)
            return torch.addmm(self.bias, x.view(-1, 4), self.weight).view(size)

    fast, expected, got = _run(Conv1D(), torch.randn(2, 3, 4), "fuse_epilogues")
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert _stats(fast, "fuse_epilogues")["to_linear"] == 1
    assert "addmm" not in ir.node_counts(fast)


def test_eliminate_dead_code_removes_unused_branch():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            _ = self.unused(x)
            return self.fc(x)

    fast, expected, got = _run(M(), torch.randn(2, 4), "eliminate_dead_code")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert ir.node_counts(fast) == {"linear": 1}
    assert not any("unused" in name for name, _ in fast.named_parameters())


class QKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.gate = nn.Linear(8, 8)

    def forward(self, x):
        return self.q(x) * self.k(x), self.v(x), torch.relu(self.gate(x))


def test_fuse_parallel_linears_merges_same_input_same_activation():
    x = torch.randn(2, 5, 8)
    fast, expected, got = _run(QKV(), x, "fuse_epilogues,fuse_parallel_linears")
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert _stats(fast, "fuse_parallel_linears") == {"merged_groups": 1, "merged_linears": 3}
    linears = [n for n in fast.graph.nodes if ir.op_name(n) == "fxopt.linear_act"]
    # q, k, v (no activation) merged into one 20-wide linear; the relu-gated one stays apart
    assert sorted(tuple(n.meta["val"].shape) for n in linears) == [(2, 5, 8), (2, 5, 20)]
    assert ir.node_counts(fast)["split_with_sizes"] == 1
