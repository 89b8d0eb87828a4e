"""The Open Inference Protocol (KServe v2) with Triton's binary-data, classification and model-configuration
extensions: request parsing, tensors and model descriptions. No HTTP framework here; `app.http.oip` routes it."""
