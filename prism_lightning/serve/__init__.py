"""`python -m prism_lightning serve`: a routed PRISM checkpoint behind an OpenAI-compatible HTTP API.

Modules: ``text_stream`` (token ids -> text deltas, stop strings), ``routed_batch`` (one routed batch
with streaming), ``engine`` (the dynamic batcher on a worker thread), ``protocol`` (request validation,
OpenAI-shaped bodies and errors), ``metrics`` (Prometheus), ``app`` (the FastAPI routes), ``cli``.
"""
