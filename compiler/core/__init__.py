"""The trunk every other part builds on: capture, the IR and passes over it.

capture (torch.export into an ATen-level FX graph), ir (node ids, layers, weights),
ops (the op kinds: the one place that knows ATen targets), pattern (matching),
fxops (the fused float ops of the fxopt namespace), pass_base / registry / pipeline /
pass_manager (what a pass is, finding passes by name, targets as data, running and
instrumenting them), report (the per-pass record), printer / render (the IR as text
and as a picture), drift and bisect (numeric drift, and the first pass and node to
exceed a tolerance), macs (parameter and MAC counts), errors.

core imports nothing of fxopt outside core/.
"""
