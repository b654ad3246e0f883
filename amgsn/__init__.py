"""amgsn — Adaptive Mask-Guide Supervised Network for facial expression recognition.

Layers (docs/method.md §2): ``amgsn.kernels`` (Triton) and ``amgsn._C`` (C++/CUDA) know nothing of
models; ``amgsn.ops`` wraps them; ``masking``, ``losses`` and ``models`` use ``ops``; ``engine``
uses everything below it; ``cli`` only parses arguments.
"""

__version__ = "0.1.0"
