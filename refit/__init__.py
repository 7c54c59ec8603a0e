"""refit: the planner and the `Refitter` (HF-named parameters, parallelism, paths, groups).

Knows HuggingFace parameter names and parallelism; never imports Megatron, vLLM or Ray.
"""
