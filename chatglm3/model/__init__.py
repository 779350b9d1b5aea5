"""The model side: every tensor. The model runner (prefill chunks, packed passes, decoding
steps, row moves, out-of-memory recovery) with its typed results (step_outputs), the KV rows,
fixed-shape decoding and CUDA graphs, warm-up, sampling and log-probabilities, the packed
attention hook, and the CPU/quantized linear layers.

May import: the engine's request types it is handed (engine.scheduler's Request and
PrefillChunk, engine.rows' Move), text (the tokenizer, for warm-up), and the shared leaves.
Never the rest of the engine, the weights' loading or the doors.
"""
