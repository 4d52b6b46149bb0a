"""Domain errors and THE error table: each stable error code -> (HTTP status, gRPC status code name).

REST and gRPC both translate errors through ``status_for`` so the two protocols never drift. The
compiler's ``KilnError`` codes are listed here too: a compiler error surfaces to the user unchanged.
"""

from __future__ import annotations


class DomainError(Exception):
    code = "internal"
    default_hint = ""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "hint": self.hint}


class InvalidSpec(DomainError):
    code = "invalid_argument"


class JobNotFound(DomainError):
    code = "job_not_found"


class ArtifactNotFound(DomainError):
    code = "artifact_not_found"


class IdempotencyConflict(DomainError):
    code = "idempotency_conflict"
    default_hint = "an Idempotency-Key names exactly one request; use a new key for a different spec"


class JobFinished(DomainError):
    code = "job_finished"


class NoWorker(DomainError):
    code = "no_worker"
    default_hint = "GET /v1/workers lists the queues live workers serve"


class Unauthenticated(DomainError):
    code = "unauthenticated"
    default_hint = "send 'Authorization: Bearer <api key>'"


class PayloadTooLarge(DomainError):
    code = "payload_too_large"


class RangeNotSatisfiable(DomainError):
    code = "range_not_satisfiable"


class RequestTimeout(DomainError):
    code = "request_timeout"


# code -> (HTTP status, gRPC code name). Unknown codes are internal errors (500 / INTERNAL).
ERROR_TABLE: dict[str, tuple[int, str]] = {
    "invalid_argument": (400, "INVALID_ARGUMENT"),
    "unsupported_architecture": (422, "INVALID_ARGUMENT"),
    "invalid_mapping": (422, "INVALID_ARGUMENT"),
    "model_not_found": (422, "INVALID_ARGUMENT"),
    "unsafe_weights": (422, "INVALID_ARGUMENT"),
    "malformed_weights": (422, "INVALID_ARGUMENT"),
    "weights_mismatch": (422, "INVALID_ARGUMENT"),
    "invalid_checkpoint": (422, "INVALID_ARGUMENT"),
    "invalid_tokenizer": (422, "INVALID_ARGUMENT"),
    "no_worker": (422, "INVALID_ARGUMENT"),
    # engine builds (service/compiler/build/config.py)
    "invalid_build_config": (422, "INVALID_ARGUMENT"),
    "unknown_backend": (422, "INVALID_ARGUMENT"),
    "backend_unavailable": (422, "FAILED_PRECONDITION"),
    "target_unavailable": (422, "FAILED_PRECONDITION"),
    "engine_does_not_fit": (422, "INVALID_ARGUMENT"),
    # quality gate of the evaluate stage: a job's terminal error, never an HTTP answer to a request
    "accuracy_below_threshold": (422, "FAILED_PRECONDITION"),
    "output_exists": (409, "ALREADY_EXISTS"),
    "idempotency_conflict": (409, "ALREADY_EXISTS"),
    "job_finished": (409, "FAILED_PRECONDITION"),
    "job_not_found": (404, "NOT_FOUND"),
    "artifact_not_found": (404, "NOT_FOUND"),
    "not_found": (404, "NOT_FOUND"),
    "method_not_allowed": (405, "UNIMPLEMENTED"),
    "unauthenticated": (401, "UNAUTHENTICATED"),
    "payload_too_large": (413, "RESOURCE_EXHAUSTED"),
    "range_not_satisfiable": (416, "OUT_OF_RANGE"),
    "request_timeout": (408, "DEADLINE_EXCEEDED"),
    "unavailable": (503, "UNAVAILABLE"),
    "internal": (500, "INTERNAL"),
}


# The hint an error carries when the code that raised it gave none: every error body tells the caller what to do.
DEFAULT_HINTS: dict[str, str] = {
    "invalid_argument": "correct the request as the message says; the API schema lists every field and its limits",
    "job_not_found": "list your jobs (GET /v1/jobs, kiln status); a job is visible only with its own tenant's key",
    "artifact_not_found": "list the job's artifacts and their files (GET /v1/jobs/{id}/artifacts)",
    "job_finished": "the job is already in a terminal state; submit a new job instead",
    "payload_too_large": "send a JobSpec, not model data",
    "range_not_satisfiable": "ask for one 'bytes=start-end' range inside the file; Content-Range gives its size",
    "not_found": "see /docs for the API's routes",
    "method_not_allowed": "use a method from the Allow header; /docs lists each route's methods",
    "unavailable": "retry shortly",
    "request_timeout": "send the whole request promptly; a body that trickles in is cut off",
    "unsupported_architecture": "GET /v1/workers and the README list the supported architectures",
    "invalid_mapping": "choose tp_size / pp_size that divide the model's heads and layers",
    "model_not_found": "put the model into the service's Hugging Face cache",
    "unsafe_weights": "use a safetensors snapshot whose files all lie in the snapshot; Kiln never runs a repository's code",
    "malformed_weights": "the weight file is corrupt or not safetensors: fetch the model snapshot again",
    "weights_mismatch": "the weights do not match config.json, or the snapshot is incomplete: fetch the model again",
    "invalid_tokenizer": "ship a tokenizer.json that loads without remote code, with ids below the model's vocab_size",
    "invalid_checkpoint": "the checkpoint is damaged: run `kiln validate` on it",
}


def status_for(code: str) -> tuple[int, str]:
    return ERROR_TABLE.get(code, ERROR_TABLE["internal"])


def error_body(exc: BaseException) -> dict[str, str]:
    """The public {code, message, hint} of any error; internals never leak."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in ERROR_TABLE:
        hint = getattr(exc, "hint", "") or DEFAULT_HINTS.get(code, "")
        return {"code": code, "message": getattr(exc, "message", str(exc)), "hint": hint}
    return {"code": "internal", "message": "internal error", "hint": "see the server log"}
