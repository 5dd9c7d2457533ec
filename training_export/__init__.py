"""Training, export (torch -> ONNX with parity checks) and import of models into the BentoML model store."""
