"""ChatGLM3-6B-32K run natively on current transformers: tokenizer, weights, generation engine."""
