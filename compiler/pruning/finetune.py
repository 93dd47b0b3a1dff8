"""Recover a pruned model's accuracy by knowledge distillation from the unpruned one.

    small = fxopt.prune(model, example, ratio=0.5)
    small = fxopt.finetune(small, model, loader, epochs=3, loss="kd", temperature=4.0)

`data` yields model inputs in the form of example_inputs (pure distillation
needs no labels) or (inputs, target) pairs for loss="kd+task" / "task".
The student is trained in place and returned; its weights become trainable
nn.Parameters (batch-norm running statistics stay frozen buffers).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule
from tqdm.auto import tqdm

from fxopt.core.ops import OpKind, batch_norm_parts, kind_of
from fxopt.pruning.training import call, first_tensor, split_item

LOSSES = ("kd", "kd+task", "task")


def finetune(student: nn.Module, teacher: nn.Module, data, epochs: int = 1, *, loss: str = "kd",
             temperature: float = 4.0, alpha: float = 0.5, lr: float = 1e-3,
             weight_decay: float = 0.0, features=(), feature_weight: float = 1.0,
             task_loss=None, schedule: str = "cosine", progress: bool = True,
             seed: int = 0, masks: dict | None = None, after_step=None,
             param_lr: dict | None = None) -> nn.Module:
    """Train `student` to match `teacher` on `data`; returns the trained student.

    loss: "kd" (KL between temperature-softened logits, times T^2), "task"
    (task_loss(output, target), cross-entropy by default) or "kd+task"
    (alpha * task + (1 - alpha) * kd). features: layer names whose outputs
    the student matches with MSE (weighted by feature_weight); they must have
    the same shape in both models (e.g. residual-stream outputs).
    schedule: "cosine" decays the learning rate to zero over all steps when
    `data` has a length, "constant" keeps it.
    masks: {parameter name: bool tensor} of unstructured pruning; the pruned entries are
    set back to zero after every optimizer step (Adam's momentum would revive them).
    after_step: called with the student after every step (masks included), e.g. to keep
    shared weights on their clusters.
    param_lr: {parameter name: learning rate} for parameters that need their own (the step
    sizes of quantization-aware training are 100x smaller than the weights).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
    torch.manual_seed(seed)
    if isinstance(student, GraphModule):
        make_trainable(student)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters")
    keep = _mask_params(student, masks or {})
    opt = torch.optim.AdamW(_param_groups(student, params, param_lr or {}), lr=lr,
                            weight_decay=weight_decay)
    sched = _schedule(opt, schedule, data, epochs)
    teacher_was_training = teacher.training
    teacher.eval()
    taps = _FeatureTaps(student, teacher, features) if features else None
    try:
        for epoch in range(epochs):
            bar = tqdm(data, desc=f"finetune {epoch + 1}/{epochs}", disable=not progress, leave=False)
            for item in bar:
                value = _step(student, teacher, item, opt, loss, temperature, alpha, task_loss,
                              taps, feature_weight)
                _reapply(keep)
                if after_step is not None:
                    after_step(student)
                bar.set_postfix(loss=f"{value:.4f}")
                if sched is not None:
                    sched.step()
    finally:
        if taps:
            taps.close()
        teacher.train(teacher_was_training)
    for p in params:
        p.grad = None
    return student


def _mask_params(student, masks: dict) -> list:
    """(parameter, mask) pairs; a mask naming no parameter is an error, not a silent no-op."""
    params = dict(student.named_parameters())
    missing = sorted(set(masks) - set(params))
    if missing:
        raise ValueError(f"pruning masks name weights the model does not train: {', '.join(missing)}")
    return [(params[n], m.to(params[n].dtype)) for n, m in masks.items()]


def _param_groups(student, params, param_lr: dict) -> list:
    """One optimizer group for the parameters at the common rate, one per param_lr entry."""
    named = {id(p): n for n, p in student.named_parameters()}
    missing = sorted(set(param_lr) - set(named.values()))
    if missing:
        raise ValueError(f"param_lr names parameters the model does not train: {', '.join(missing)}")
    groups = [{"params": [p for p in params if named.get(id(p)) not in param_lr]}]
    groups += [{"params": [p], "lr": param_lr[named[id(p)]]} for p in params if named.get(id(p)) in param_lr]
    return [g for g in groups if g["params"]]


@torch.no_grad()
def _reapply(keep: list) -> None:
    for p, m in keep:
        p.mul_(m)


def _schedule(opt, schedule, data, epochs):
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}; use 'cosine' or 'constant'")
    if schedule == "constant" or not hasattr(data, "__len__"):
        return None
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, len(data) * epochs))


def _step(student, teacher, item, opt, loss, temperature, alpha, task_loss, taps, feature_weight):
    inputs, target = split_item(item)
    if loss != "kd" and target is None:
        raise ValueError(f"loss={loss!r} needs (inputs, target) pairs in data")
    if taps:
        taps.clear()
    with torch.no_grad():
        t_out = first_tensor(call(teacher, inputs)) if loss != "task" else None
    s_out = first_tensor(call(student, inputs))
    total = s_out.new_zeros(())
    if loss != "task":
        total = total + (1 - alpha if loss == "kd+task" else 1.0) * kd_loss(s_out, t_out, temperature)
    if loss != "kd":
        fn = task_loss or (lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)))
        total = total + (alpha if loss == "kd+task" else 1.0) * fn(s_out, target)
    if taps:
        total = total + feature_weight * taps.loss()
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    return float(total.detach())


def kd_loss(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """Hinton distillation: KL(teacher || student) of softened distributions, times T^2."""
    t = temperature
    s = F.log_softmax(student_logits.reshape(-1, student_logits.shape[-1]) / t, dim=-1)
    p = F.log_softmax(teacher_logits.reshape(-1, teacher_logits.shape[-1]) / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


def make_trainable(gm: GraphModule) -> GraphModule:
    """Turn the float weight buffers of a captured graph (those add_weight registered)
    into nn.Parameters; batch-norm running statistics stay buffers."""
    stats = set()
    for node in gm.graph.nodes:
        if kind_of(node) is OpKind.BATCH_NORM:
            _, _, _, mean, var, _ = batch_norm_parts(node)
            stats.update(str(n.target) for n in (mean, var) if n is not None)
    for node in gm.graph.nodes:
        name = str(node.target)
        if node.op != "get_attr" or name in stats:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        tensor = getattr(owner, attr)
        if attr in owner._buffers and tensor.is_floating_point():
            del owner._buffers[attr]
            owner.register_parameter(attr, nn.Parameter(tensor.detach().clone()))
    for p in gm.parameters():
        p.requires_grad_(True)
    return gm


class _FeatureTaps:
    """Outputs of named layers in teacher (forward hooks) and student (graph nodes)."""

    def __init__(self, student, teacher, names):
        self.names = list(names)
        self.student, self.teacher = {}, {}
        self.handles = [teacher.get_submodule(n).register_forward_hook(self._hook(n)) for n in self.names]
        self.nodes = {}
        if isinstance(student, GraphModule):
            for node in student.graph.nodes:
                layer = node.meta.get("fxopt_layer", "")
                for n in self.names:
                    if node.op == "call_function" and (layer == n or layer.startswith(n + ".")):
                        self.nodes[n] = node      # the last node of the layer is its output
            missing = [n for n in self.names if n not in self.nodes]
            if missing:
                raise ValueError(f"no node of layer(s) {missing} in the student graph")
            self._tap_graph(student)
        else:
            self.handles += [student.get_submodule(n).register_forward_hook(self._hook(n, True))
                             for n in self.names]

    def _hook(self, name, student=False):
        def hook(_mod, _inp, out):
            (self.student if student else self.teacher)[name] = first_tensor(out)
        return hook

    def _tap_graph(self, gm):
        self.gm = gm
        self.inserted = []
        for name, node in self.nodes.items():
            with gm.graph.inserting_after(node):
                self.inserted.append(gm.graph.call_function(_record, (node, id(self), name)))
        _STORES[id(self)] = self.student
        gm.recompile()

    def clear(self):
        self.student.clear()
        self.teacher.clear()

    def loss(self):
        total = 0.0
        for n in self.names:
            s, t = self.student[n], self.teacher[n]
            if s.shape != t.shape:
                raise ValueError(f"feature {n}: student shape {tuple(s.shape)} != teacher "
                                 f"{tuple(t.shape)}; distil features of unpruned width only")
            total = total + F.mse_loss(s, t)
        return total

    def close(self):
        for h in self.handles:
            h.remove()
        _STORES.pop(id(self), None)
        if getattr(self, "inserted", None):
            for node in self.inserted:
                self.gm.graph.erase_node(node)
            self.gm.recompile()


# Graph nodes can only carry plain arguments, so a tap finds its store by id.
_STORES: dict = {}


def _record(x, store_id, name):
    _STORES[store_id][name] = x
    return x
