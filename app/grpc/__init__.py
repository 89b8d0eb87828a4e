"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService` on its own port, beside HTTP, on the same
engine (so a gRPC request and an HTTP request can share a batch), with the standard health service and reflection.
The protocol itself (requests, outputs, model descriptions) is `app.protocols.oip`'s; this is the gRPC adapter."""
