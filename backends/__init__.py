"""backends: the real sides (Megatron-core trainers, vLLM engines) and Ray to run them.

The only package that imports megatron, vllm or ray.
"""
