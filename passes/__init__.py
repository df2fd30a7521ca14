"""Graph passes and analyses: canonicalize, discover groups, score, allocate, apply plan,
clean up, verify. Passes follow the onnx_ir.passes contract (``PassResult(model, modified)``)."""
