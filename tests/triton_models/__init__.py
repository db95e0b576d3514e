"""Triton python-backend test models the e2e tests write into a model repository."""
