"""Frontends: lower models from files or frameworks to one onnx_ir.Model, and write results."""
