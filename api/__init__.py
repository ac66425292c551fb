"""The loftq-service HTTP API (FastAPI). Never imports torch: the API image stays small."""
