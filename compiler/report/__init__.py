"""What optimization did to a model, for the user to read.

model_report (per layer precision and error; size, MACs and latency before and
after), pareto (the trade-off the accuracy-budgeted search saw: front, tables, plot).
The per-pass record itself is core.report, which the pass manager fills.
"""
