"""The model zoo every fxopt test draws from: small, seeded, random weights.

Each builder returns ``(model, example_inputs, other_inputs)``: the model in
eval mode, the inputs to capture with, and inputs with a different batch size
and (where the model has one) a different sequence length or image size, to
check that a captured graph answers other shapes. Nothing is downloaded: Hugging Face
models are built from small configs.

    model, example, other = ZOO["bert"]()
    gm = fxopt.capture(model, example)
    gm(**other)                     # HF models take keyword inputs
"""
import pytest
import torch
from torch import nn

from fxopt import examples

SEED = 0


def randomize_batchnorm(model: nn.Module, seed: int = SEED) -> nn.Module:
    """Non-trivial BatchNorm statistics, so BN folding is really tested."""
    return examples.randomize_batchnorm(model, seed, mean_std=0.5, var_range=(0.5, 2.0),
                                        gamma_range=(0.5, 1.5), beta_std=0.2)


# the size of the `other` images of models that take any image size: odd, not square
OTHER_HW = (37, 45)


def _image(batch: int, channels: int = 3, size: int = 32, width: int = None) -> torch.Tensor:
    return torch.randn(batch, channels, size, width or size)


def _tokens(batch: int, seq: int, vocab: int, with_types: bool = True) -> dict:
    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 2:] = 0  # padding on one row exercises the attention mask
    out = {"input_ids": ids, "attention_mask": mask}
    if with_types:
        out["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return out


# ---------------------------------------------------------------- local models

class MLP(nn.Module):
    def __init__(self, d_in=32, d_hidden=64, d_out=10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.act1 = nn.ReLU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.act2 = nn.GELU()
        self.fc3 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.drop(self.act1(self.fc1(x))))))


class ResidualBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + x)


class CNNBNResidual(nn.Module):
    def __init__(self, c=8, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.block1 = ResidualBlock(c)
        self.pool = nn.MaxPool2d(2)
        self.block2 = ResidualBlock(c)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.relu(self.bn(self.stem(x)))
        x = self.pool(self.block1(x))
        return self.head(self.flatten(self.gap(self.block2(x))))


class DWSepBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.dw = nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False)
        self.bn_dw = nn.BatchNorm2d(c_in)
        self.act = nn.ReLU6()
        self.pw = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return self.act(self.bn_pw(self.pw(self.act(self.bn_dw(self.dw(x))))))


class DWSepCNN(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.block1 = DWSepBlock(8, 16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.bn_g = nn.BatchNorm2d(16)
        self.block2 = DWSepBlock(16, 16)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.block1(self.stem(x))
        x = torch.relu(self.bn_g(self.grouped(x)))
        x = self.gap(self.block2(x))
        return self.head(torch.flatten(x, 1))


def _seeded(build):
    torch.manual_seed(SEED)
    return build()


def mlp():
    model = _seeded(MLP).eval()
    return model, (torch.randn(4, 32),), (torch.randn(7, 32),)


def cnn_bn_residual():
    model = randomize_batchnorm(_seeded(CNNBNResidual)).eval()
    return model, (_image(2),), (_image(5, 3, *OTHER_HW),)


def dwsep_cnn():
    model = randomize_batchnorm(_seeded(DWSepCNN)).eval()
    return model, (_image(2),), (_image(3, 3, *OTHER_HW),)


def transformer_encoder():
    """nn.TransformerEncoder on [batch, seq, d_model] inputs.

    Why enable_nested_tensor=False and no padding mask: in eval mode the
    layers may take the fused `_transformer_encoder_layer_fwd` fast path;
    under export (fake tensors, no grad mode guarantees) it falls back to
    the ordinary ATen ops, and without nested tensors the output shape never
    depends on the data.
    """
    def build():
        layer = nn.TransformerEncoderLayer(
            d_model=32, nhead=4, dim_feedforward=64, dropout=0.1, batch_first=True)
        return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    model = _seeded(build).eval()
    return model, (torch.randn(2, 8, 32),), (torch.randn(3, 5, 32),)


# ---------------------------------------------------------------- Hugging Face

def _hf(config_cls_name: str, model_cls_name: str, sdpa: bool = False, **config):
    """Build a Hugging Face model from a small config, random seeded weights."""
    import transformers

    cfg = getattr(transformers, config_cls_name)(**config)
    if sdpa:
        # Why: the sdpa attention path exports as one
        # aten.scaled_dot_product_attention node the passes can match.
        cfg._attn_implementation = "sdpa"
    torch.manual_seed(SEED)
    model = getattr(transformers, model_cls_name)(cfg)
    return randomize_batchnorm(model).eval()


def bert():
    model = _hf("BertConfig", "BertForSequenceClassification", sdpa=True,
                vocab_size=100, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=64, num_labels=3)
    torch.manual_seed(SEED)
    return model, _tokens(2, 8, 100), _tokens(3, 12, 100)


def distilbert():
    model = _hf("DistilBertConfig", "DistilBertModel", sdpa=True,
                vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                max_position_embeddings=64)
    torch.manual_seed(SEED)
    return (model, _tokens(2, 8, 100, with_types=False),
            _tokens(3, 12, 100, with_types=False))


def vit():
    model = _hf("ViTConfig", "ViTModel", sdpa=True,
                image_size=32, patch_size=8, num_channels=3, hidden_size=32,
                num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(SEED)
    return model, {"pixel_values": _image(2)}, {"pixel_values": _image(3)}


def resnet():
    model = _hf("ResNetConfig", "ResNetModel",
                num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                depths=[1, 1], layer_type="basic")
    torch.manual_seed(SEED)
    return model, {"pixel_values": _image(2)}, {"pixel_values": _image(3, 3, *OTHER_HW)}


def mobilenet_v2():
    model = _hf("MobileNetV2Config", "MobileNetV2Model",
                num_channels=3, image_size=32, depth_multiplier=0.35,
                finegrained_output=False)
    torch.manual_seed(SEED)
    return model, {"pixel_values": _image(2)}, {"pixel_values": _image(3)}


def efficientnet():
    """EfficientNet (B0's block layout, narrowed; hidden_dim = the head conv's 1280 channels at that
    width): squeeze-excite, SiLU, TF-style padding."""
    model = _hf("EfficientNetConfig", "EfficientNetModel",
                num_channels=3, image_size=32, width_coefficient=0.25, depth_coefficient=0.5, hidden_dim=320)
    torch.manual_seed(SEED)
    return model, {"pixel_values": _image(2)}, {"pixel_values": _image(3)}


def squeezenet():
    """SqueezeNet 1.1 (fxopt.examples): fire modules, concat, ceil-mode max pools. At 32x32 its
    last pools reach 1x1 and torch.export cannot keep the size dynamic; at 64x64 it can."""
    model = _seeded(lambda: examples.SqueezeNet11(classes=10)).eval()
    return model, {"pixel_values": _image(2, 3, 64)}, {"pixel_values": _image(3, 3, *OTHER_HW)}


def convnext():
    model = _hf("ConvNextConfig", "ConvNextModel",
                num_channels=3, num_stages=2, hidden_sizes=[8, 16],
                depths=[1, 1], image_size=32)
    torch.manual_seed(SEED)
    return model, {"pixel_values": _image(2)}, {"pixel_values": _image(3, 3, *OTHER_HW)}


def gpt2(use_cache: bool = False):
    model = _hf("GPT2Config", "GPT2LMHeadModel", sdpa=True,
                vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                bos_token_id=0, eos_token_id=0,
                use_cache=use_cache)
    torch.manual_seed(SEED)
    return (model, _tokens(2, 8, 100, with_types=False),
            _tokens(3, 12, 100, with_types=False))


ZOO = {
    "mlp": mlp,
    "cnn_bn_residual": cnn_bn_residual,
    "dwsep_cnn": dwsep_cnn,
    "transformer_encoder": transformer_encoder,
    "bert": bert,
    "distilbert": distilbert,
    "vit": vit,
    "resnet": resnet,
    "mobilenet_v2": mobilenet_v2,
    "convnext": convnext,
    "efficientnet": efficientnet,
    "squeezenet": squeezenet,
    "gpt2": gpt2,
}

# captured in well under a second each: the fast tier (`-m "not slow"`) keeps these;
# tests that optimize keep only the mlp (a conv model takes 2-5 s through a pipeline)
SMALL = ("mlp", "cnn_bn_residual", "dwsep_cnn")


def zoo_params(names=None, fast=SMALL) -> list:
    """Zoo names for @pytest.mark.parametrize, the ones not in `fast` marked slow."""
    return [name if name in fast else pytest.param(name, marks=pytest.mark.slow)
            for name in (ZOO if names is None else names)]


HF_MODELS = ["bert", "distilbert", "vit", "resnet", "mobilenet_v2", "convnext", "gpt2"]

# Models whose inputs have a sequence dimension (dim 1) besides the batch.
SEQUENCE_MODELS = ["transformer_encoder", "bert", "distilbert", "gpt2"]
