"""`peftkit serve`: an OpenAI-compatible server where every request picks its adapter, and requests for different
adapters share forward passes (continuous batching with per-row routing). Needs ``pip install 'peftkit[serve]'``.

    app.py        the routes (FastAPI), errors, API key, body limits
    protocol.py   OpenAI's request / response shapes and the server's limits
    engine.py     the thread that owns the model: admission, prefill, decoding steps
    batch.py      the running batch's key/value cache: join, step, leave
    adapters.py   known and resident adapters (LRU), runtime loading rules
    sampling.py   greedy / temperature / top-p sampling, incremental detokenisation and stop strings
    server.py     model + tokenizer + adapters -> a server; uvicorn

Nothing here is imported by ``import peftkit``.
"""
