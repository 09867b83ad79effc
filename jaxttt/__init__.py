"""jaxttt: a JAX/Flax NNX stack for mHC pretraining, TTT-Discover and SDFT."""
__version__ = "0.1.0"
