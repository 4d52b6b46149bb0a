"""Engine backends: ``torch`` (default, Kiln's own engine), ``onnx``, ``tensorrt``, ``trtllm``.

Each backend module exposes one ``build_*`` function taking (checkpoint dir, ResolvedBuild, out dir).
The TensorRT ones are imported only when their packages import (see ``..capabilities``).
"""
