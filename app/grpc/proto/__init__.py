"""The protocol's messages and service: `inference.proto`, and the modules generated from it at build time
(`inference_pb2`, `inference_pb2_grpc`; setup.py)."""
