"""`videoxl serve`: an OpenAI-compatible HTTP server over the same model and video KV cache as the Python API.

Reading order: protocol.py (the request) -> media.py (URLs -> checked files) -> engine.py (workers, queue)
-> remote.py (a worker's model in a process of its own) -> app.py (HTTP) -> cli/serve.py (options, start-up).
FastAPI and uvicorn are imported only when a server starts.
"""
