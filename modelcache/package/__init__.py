"""Packaging: writing OCI image layouts and manifests for models."""
