"""An OpenAI-compatible HTTP server over the runtime's scheduler (FastAPI + uvicorn)."""
