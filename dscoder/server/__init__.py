"""`dscoder serve`: the engine kept resident behind HTTP (OpenAI routes, llama.cpp's /infill).

app.py holds the routes, worker.py the one-at-a-time generation queue and the prefix cache,
schemas.py the request bodies, serve.py the process (sockets, keep-alive, signals), client.py
the CLI's remote engine. Only serve.py and app.py import the ASGI stack.
"""
