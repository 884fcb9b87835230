"""Headway: a self-hosted inference stack."""
__version__ = "0.1.0"
