"""`python -m chatglm3 serve`: an OpenAI-compatible HTTP API on the batched engine.

protocol.py reads OpenAI request bodies into our types (messages, SamplingParams), with errors
that name the field; responses.py writes OpenAI's response and chunk shapes; app.py is the
Starlette application (auth, body limits, the wait queue, streaming, disconnects); serve.py the
command line (uvicorn). Only serve.py's parser is imported by the CLI before a command runs.
"""
