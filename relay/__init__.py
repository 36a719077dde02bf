"""relay: a multi-region, replicated, in-memory relay for real-time chat."""

__version__ = "0.1.0"
