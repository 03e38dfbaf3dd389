"""Serving: the continuous batcher (``batcher.py``) and the OpenAI-compatible HTTP server on it (``app.py``)."""
