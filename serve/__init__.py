"""Serving: the engine (`engine.Engine`, continuous batching over the paged KV cache) and the
OpenAI-compatible HTTP server in front of it (`api`, `llmc serve`; `pip install 'llmc[serve]'`)."""
