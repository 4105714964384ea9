"""The model stages: small classes with a declared identity, a version string and a lazily loaded model."""
