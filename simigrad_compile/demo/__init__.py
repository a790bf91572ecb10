"""The demo: a byte-level GPT on the Python standard library's sources, trained with a fixed small batch, with
SimiGrad, and with a fixed batch equal to SimiGrad's average (``python -m simigrad_compile demo``)."""
