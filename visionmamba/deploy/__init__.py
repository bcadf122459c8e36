"""How Vim gets into a runtime: ONNX files, the runtimes' kernels, deploy bundles.

* :mod:`.export`: ``visionmamba export`` (ONNX with the fused nodes or standard operators only, and
  ``torch.export``), each file checked against PyTorch before it is written; sessions in ONNX Runtime and
  OpenVINO with our kernels.
* :mod:`.onnx_nodes`: the fused nodes ``visionmamba.ConvSiLU`` / ``BiSelectiveScan`` an export writes.
* :mod:`.onnx_graph`: their standard-operator bodies as model-local functions, inlined for a standard file.
* :mod:`.runtime_kernels` and ``csrc/``: ONNX Runtime's custom-op library and OpenVINO's extension, built
  from the kernels of ``ops/scan/csrc`` (the PyTorch ops run the same code).
* :mod:`.bundle`: a folder with the file, both libraries built for this machine and how to load them.

It imports the op contract (``ops``) and the models; nothing below imports it. A plain
``torch.onnx.export`` needs none of it: it writes the ``loop`` backend's standard operators.
"""
