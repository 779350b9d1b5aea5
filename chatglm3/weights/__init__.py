"""The weights: fetching a checkpoint (hub snapshot, tar/tar.gz URL, local folder; resumable,
verified), its files and layouts, and loading it shard by shard into transformers'
`GlmForCausalLM` (quantized or packed as asked).

May import: the model side's layers it builds with (model.attention, packed_linear, quantize),
text (the tokenizer's stop ids) and the shared leaves. Never the engine or the doors.
"""
