"""Low-level file formats that every layer reads and writes: TFLite flatbuffers (tflite)."""
