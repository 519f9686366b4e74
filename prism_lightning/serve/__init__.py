"""`python -m prism_lightning serve`: a routed PRISM checkpoint behind an OpenAI-compatible HTTP API.

Generation, routing and streaming come from :mod:`prism_lightning.engines` (``hf_stream``: routed
batches with streaming, run to their end or joined between steps; ``text_stream``: token ids -> text
deltas, stop strings); serve keeps the queue and batching policy and HTTP. Modules: ``engine`` (the engine
base and the hf engine's continuous or static scheduler on a worker thread),
``vllm_engine`` (vLLM's engine, the adapter as a per-request LoRA, routed by the prefix gate),
``protocol`` (request validation, OpenAI-shaped bodies and errors), ``metrics`` (Prometheus), ``guard``
(the API key, the body-size limit, the bound on requests in flight), ``app`` (the FastAPI routes), ``cli``.
"""
