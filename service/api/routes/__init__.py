"""The REST routes, one APIRouter per resource: jobs, artifacts, ops (health, readiness, metrics, workers) and
docs (Swagger UI / ReDoc). ``service.api.app.create_app`` includes them."""
