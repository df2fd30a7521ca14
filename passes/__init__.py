"""Graph passes and analyses: canonicalize, discover groups, score, allocate, apply plan,
remove residual blocks (depth), clean up, verify. Passes follow the onnx_ir.passes contract (``PassResult(model, modified)``)."""
