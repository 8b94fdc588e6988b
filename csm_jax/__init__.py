"""csm-jax: Sesame CSM-1B and Kyutai Mimi in JAX."""

__version__ = "0.1.0"
