"""Kiln: a model-compilation service (compiler library, CLI, REST/gRPC API, workers)."""
