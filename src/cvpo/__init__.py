"""CVPO core: Ray-free math and environment plumbing."""

__version__ = "0.1.0"
