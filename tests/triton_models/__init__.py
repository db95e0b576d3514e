"""Triton python-backend models written by tests (model repositories built under tmp_path)."""
