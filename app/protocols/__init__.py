"""Wire protocols over the engine, independent of the transport: the Open Inference Protocol (KServe v2), and the API
keys that HTTP and gRPC both check."""
