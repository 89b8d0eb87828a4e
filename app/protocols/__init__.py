"""Wire protocols over the engine, independent of the transport: the Open Inference Protocol (KServe v2)."""
