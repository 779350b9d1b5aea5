"""Text: the SentencePiece tokenizer with ChatGLM3's chat format, conversation parsing and
checks (messages), and streaming output (incremental detokenizer, stop-string matcher).

May import: the shared leaves (errors) only; no torch.
"""
