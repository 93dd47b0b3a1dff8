"""The accuracy-budgeted search: the cheapest configuration within a metric budget.

sensitivity (per-layer int8 error and latency, cheapest measurements first),
budget (the search over int8/fp32 per layer, prune ratios and distillation).
"""
