"""ChatGLM3-6B-32K run natively on current transformers: tokenizer, weights, generation engine."""

import logging as _logging


class _TorchaoNoise(_logging.Filter):
    """Drops two import-time warnings of torchao 0.18 (which transformers imports whenever it is
    installed): one per optional CUDA/mxfp8 extension its wheel cannot load into this torch
    build, and torch's deprecation notes about the Enums it registers. Neither extension is used
    here (chatglm3/model/quantize.py says what runs); every other warning passes."""

    def filter(self, record: _logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("Failed to load ") and ".so" in msg
                    or "is an Enum subclass and is now natively supported" in record.getMessage())


_logging.getLogger("torchao").addFilter(_TorchaoNoise())
_logging.getLogger("torch.utils._pytree").addFilter(_TorchaoNoise())
