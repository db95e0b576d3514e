"""The client-facing doors: HTTP and gRPC adapters that only translate between the wire and
the one protocol-independent inference pipeline (pipeline.py)."""
