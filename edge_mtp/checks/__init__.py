"""A built bundle run against PyTorch: the streamed reference check that gates every LiteRT export (bundle_check)
and the quantization report that measures a quantized bundle against its fp32 twin (quality)."""
