"""`python -m prism_lightning serve`: a routed PRISM checkpoint behind an OpenAI-compatible HTTP API.

Modules: ``text_stream`` (token ids -> text deltas, stop strings), ``routed_batch`` (one routed batch
with streaming), ``engine`` (the engine base and the hf dynamic batcher on a worker thread),
``vllm_engine`` (vLLM's engine, the adapter as a per-request LoRA, routed by the prefix gate),
``protocol`` (request validation, OpenAI-shaped bodies and errors), ``metrics`` (Prometheus), ``guard``
(the API key, the body-size limit, the bound on requests in flight), ``app`` (the FastAPI routes), ``cli``.
"""
