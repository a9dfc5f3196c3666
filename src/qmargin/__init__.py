"""qmargin: train, stress-test and certify low-precision neural networks."""

__version__ = "0.1.0"
