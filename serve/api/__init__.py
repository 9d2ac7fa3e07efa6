"""The HTTP API: the FastAPI app, problem details, rate limits and the API client."""
