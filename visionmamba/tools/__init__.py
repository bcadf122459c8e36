"""Using a model: inference and features, ONNX export, the speed/memory benchmark, the demos."""
