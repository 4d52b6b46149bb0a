"""Checkpoint I/O: safetensors files, the rank mapping, the pipeline split, and reading and
validating TensorRT-LLM checkpoints."""
