"""Typed errors of the compiler library.

Every error carries a stable ``code`` (the service maps codes to HTTP statuses and gRPC codes in one
table), a message that names the file / tensor / numbers involved, and a ``hint`` for the user.
"""

from __future__ import annotations


class KilnError(Exception):
    """Base class: ``code`` is stable and machine-readable; ``hint`` tells the user what to do."""

    code = "compiler_error"
    default_hint = ""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:  # message plus hint, so CLI users see both
        return f"{self.message}" + (f" (hint: {self.hint})" if self.hint else "")

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "hint": self.hint}


class InvalidArgument(KilnError):
    code = "invalid_argument"


class UnsupportedArchitecture(KilnError):
    code = "unsupported_architecture"
    default_hint = "supported architectures are listed by `kiln convert --help`"


class InvalidMapping(KilnError):
    """A tensor/pipeline split the model's shape cannot take."""

    code = "invalid_mapping"


class ModelNotFound(KilnError):
    code = "model_not_found"
    default_hint = "pass a local Hugging Face folder, or a repo id present in the HF cache (HF_HUB_OFFLINE=1)"


class UnsafeWeights(KilnError):
    """Pickle weights, remote code, or file names that escape the model folder."""

    code = "unsafe_weights"
    default_hint = "use a safetensors snapshot whose files all lie in the snapshot; Kiln never runs a repository's code"


class MalformedWeights(KilnError):
    """A safetensors file whose header or layout is invalid (names the file and tensor)."""

    code = "malformed_weights"
    default_hint = "the weight file is corrupt or not safetensors: fetch the model snapshot again"


class WeightsMismatch(KilnError):
    """Weights and config disagree: missing shard or tensor, wrong shape."""

    code = "weights_mismatch"
    default_hint = "the weights do not match config.json, or the snapshot is incomplete: fetch the model again"


class InvalidTokenizer(KilnError):
    """Tokenizer files that cannot be read as data (malformed, remote code, ids beyond the model's vocabulary)."""

    code = "invalid_tokenizer"
    default_hint = ("ship a tokenizer.json (with tokenizer_config.json) that loads without remote code and whose ids "
                    "stay below the model's vocab_size")


class InvalidCheckpoint(KilnError):
    code = "invalid_checkpoint"


class OutputExists(KilnError):
    code = "output_exists"
    default_hint = "choose another output directory or pass --overwrite"
