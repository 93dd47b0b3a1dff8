"""The models `fxopt bench models` measures: configs, seeded weights, inputs, calibration data.

    spec = SPECS["bert_b8_s128"]
    model = build(spec.family, small=False)        # eval mode, never run
    inputs = make_inputs(spec, small=False)        # kwargs dict, e.g. {"input_ids": ...}
    calib = calibration_batches(spec, small=False) # list of kwargs dicts

Nothing downloads: every model is a Hugging Face architecture built from a
config with random weights from a fixed seed. `small=True` swaps in tiny
configs and shapes with the same names, for smoke runs and the test.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fxopt import examples

SEED = 0
INPUT_SEED = 1
CALIB_SEED = 2


@dataclass(frozen=True)
class Spec:
    """One benchmark entry: an architecture at one input size."""
    name: str
    family: str          # "bert", "resnet50", "mobilenetv2", "efficientnet" or "squeezenet"
    batch: int
    size: int            # sequence length (bert) or image side (conv nets)
    output: str          # the output compared by cosine, flattened
    calib_batches: int = 4
    calib_batch: int = 8

    def shape_text(self) -> str:
        if self.family == "bert":
            return f"batch {self.batch} x seq {self.size}"
        return f"batch {self.batch} x 3x{self.size}x{self.size}"


# The set; the output compared is the encoder's last hidden state for
# every model: it is what every system computes (no random classifier head on
# top), and being unpooled it shows per-position error that pooling averages out.
SPECS = {
    "bert_b8_s128": Spec("bert_b8_s128", "bert", 8, 128, "last_hidden_state"),
    "bert_b1_s32": Spec("bert_b1_s32", "bert", 1, 32, "last_hidden_state"),
    "resnet50_b1": Spec("resnet50_b1", "resnet50", 1, 224, "last_hidden_state"),
    "resnet50_b8": Spec("resnet50_b8", "resnet50", 8, 224, "last_hidden_state"),
    "mobilenetv2_b1": Spec("mobilenetv2_b1", "mobilenetv2", 1, 224, "last_hidden_state"),
    "mobilenetv2_b8": Spec("mobilenetv2_b8", "mobilenetv2", 8, 224, "last_hidden_state"),
    "efficientnet_b0_b1": Spec("efficientnet_b0_b1", "efficientnet", 1, 224, "last_hidden_state"),
    "squeezenet_b1": Spec("squeezenet_b1", "squeezenet", 1, 224, "logits"),
}

SMALL_SPECS = {
    "bert_b8_s128": Spec("bert_b8_s128", "bert", 2, 16, "last_hidden_state", 2, 2),
    "bert_b1_s32": Spec("bert_b1_s32", "bert", 1, 8, "last_hidden_state", 2, 2),
    "resnet50_b1": Spec("resnet50_b1", "resnet50", 1, 64, "last_hidden_state", 2, 2),
    "resnet50_b8": Spec("resnet50_b8", "resnet50", 2, 64, "last_hidden_state", 2, 2),
    "mobilenetv2_b1": Spec("mobilenetv2_b1", "mobilenetv2", 1, 64, "last_hidden_state", 2, 2),
    "mobilenetv2_b8": Spec("mobilenetv2_b8", "mobilenetv2", 2, 64, "last_hidden_state", 2, 2),
    "efficientnet_b0_b1": Spec("efficientnet_b0_b1", "efficientnet", 1, 64, "last_hidden_state", 2, 2),
    "squeezenet_b1": Spec("squeezenet_b1", "squeezenet", 1, 64, "logits", 2, 2),
}

_CONFIGS = {
    "bert": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, vocab_size=30522, max_position_embeddings=512),
    "resnet50": dict(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                     embedding_size=64, layer_type="bottleneck"),
    "mobilenetv2": dict(),
    # B0: EfficientNetConfig's defaults are B7's (width 2.0, depth 3.1, 600 pixels)
    "efficientnet": dict(width_coefficient=1.0, depth_coefficient=1.0, image_size=224, hidden_dim=1280),
    "squeezenet": dict(classes=1000),
}
_SMALL_CONFIGS = {
    "bert": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=128, vocab_size=1000, max_position_embeddings=64),
    "resnet50": dict(depths=[1, 1], hidden_sizes=[32, 64], embedding_size=16,
                     layer_type="bottleneck"),
    "mobilenetv2": dict(depth_multiplier=0.35, image_size=64),
    "efficientnet": dict(width_coefficient=0.25, depth_coefficient=0.5, image_size=64, hidden_dim=320),
    "squeezenet": dict(classes=10),
}
_CLASSES = {"bert": ("BertConfig", "BertModel"), "resnet50": ("ResNetConfig", "ResNetModel"),
            "mobilenetv2": ("MobileNetV2Config", "MobileNetV2Model"),
            "efficientnet": ("EfficientNetConfig", "EfficientNetModel")}


def specs(small: bool) -> dict[str, Spec]:
    return SMALL_SPECS if small else SPECS


def config_of(family: str, small: bool) -> dict:
    """The config keyword arguments of a family (recorded in the JSON)."""
    return dict((_SMALL_CONFIGS if small else _CONFIGS)[family])


def build(family: str, small: bool, seed: int = SEED) -> nn.Module:
    """The family's model in eval mode with seeded random weights (BERT on the sdpa path)."""
    kwargs = config_of(family, small)
    if family == "squeezenet":              # not a Hugging Face model: fxopt.examples
        torch.manual_seed(seed)
        return examples.SqueezeNet11(**kwargs).eval()
    import transformers
    config_name, model_name = _CLASSES[family]
    if family == "bert":
        kwargs["attn_implementation"] = "sdpa"
    cfg = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg)
    if family == "efficientnet":
        # Its pooler, AvgPool2d(hidden_dim, ceil_mode=True), is a global average pool that
        # OpenVINO's ONNX reader rejects (a kernel larger than the input); this one is the same
        model.pooler = nn.AdaptiveAvgPool2d(1)
    return randomize_batchnorm(model, seed).eval()


def randomize_batchnorm(model: nn.Module, seed: int = SEED) -> nn.Module:
    """Non-trivial BatchNorm statistics (small, so a 50-layer net stays well scaled)."""
    return examples.randomize_batchnorm(model, seed, mean_std=0.1, var_range=(0.75, 1.25),
                                        gamma_range=(0.75, 1.25), beta_std=0.1)


def make_inputs(spec: Spec, small: bool, batch: int | None = None, seed: int = INPUT_SEED) -> dict:
    """Keyword inputs for one call of the spec's model (batch defaults to the spec's)."""
    gen = torch.Generator().manual_seed(seed)
    batch = spec.batch if batch is None else batch
    if spec.family != "bert":
        return {"pixel_values": torch.randn(batch, 3, spec.size, spec.size, generator=gen)}
    vocab = config_of("bert", small)["vocab_size"]
    seq = spec.size
    mask = torch.ones(batch, seq, dtype=torch.long)
    # Why: padding on the last row keeps the attention mask live in every
    # system; with an all-ones mask eager Hugging Face may drop the mask and
    # take a path the exported graphs cannot.
    mask[-1, seq - max(1, seq // 8):] = 0
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=gen),
            "attention_mask": mask,
            "token_type_ids": torch.zeros(batch, seq, dtype=torch.long)}


def calibration_batches(spec: Spec, small: bool) -> list[dict]:
    """fxopt's calibration data: `calib_batches` batches of `calib_batch`, unlike the timed input."""
    return [make_inputs(spec, small, batch=spec.calib_batch, seed=CALIB_SEED + i)
            for i in range(spec.calib_batches)]
