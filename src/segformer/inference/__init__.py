"""Running a model: image decoding, the image processor, exact labels, inference modes, the
engines (one module per backend), ONNX export, the Segmenter, video and visualisation."""
