"""``python -m timesformer_kernels``: print what this install can run (``tk.info()``)."""
from .info import info

print(info())
