"""Structured pruning and recovering accuracy after it.

dependency and dim_maps (which dimensions must be pruned together), importance
(how much each channel, neuron or head matters), prune_apply (cutting a group out of
the graph), structured (the pruning driver: ratios, scopes, the PruneReport, and
splicing pruning into a pipeline), finetune and training (knowledge distillation
from the unpruned model), lottery_history (the per-round record of
fxopt.lottery_ticket: table and plot).
"""
