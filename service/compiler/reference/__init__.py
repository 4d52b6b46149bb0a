"""Kiln's reference runtime: eager PyTorch over TensorRT-LLM checkpoints (the numerical oracle).

    from service.compiler.reference import ReferenceModel, load_checkpoint_weights
    m = ReferenceModel.from_checkpoint("./ckpt")   # any tp x pp split; float32 logits
    config, weights = load_checkpoint_weights("./ckpt")   # merged tp=1/pp=1 weights, global layer ids
"""

from .checkpoint_loader import SUPPORTED_ARCHITECTURES, load_checkpoint_weights
from .model import KVCache, ReferenceModel, rope_inv_freq

__all__ = ["SUPPORTED_ARCHITECTURES", "KVCache", "ReferenceModel", "load_checkpoint_weights", "rope_inv_freq"]
