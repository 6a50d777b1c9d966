"""Vision backends (PyTorch, ONNX Runtime, TensorRT) and the LLM backend."""
