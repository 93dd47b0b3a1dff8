"""The compile driver: model and options in, optimized graph and report out.

compile (check options, capture, build the pipeline, run the pass manager against the
unoptimized model's outputs, add the model sections of the report). optimize, bisect,
prune and the budgeted search all run through it.
"""
