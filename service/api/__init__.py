"""API layer: FastAPI app, gRPC server, dashboard, and the `kiln` service commands."""
