"""llamacluster's controller side: machines in, a serving Ray cluster out (no vLLM needed here)."""

__version__ = "0.1.0"
