"""The FMNIST benchmark's base model and data (the code lives in `fedclip.exporters.base_pretrain`).

Kept as the benchmarks' import point; see that module for how the base is made and why.
"""

from fedclip.exporters.base_pretrain import (  # noqa: F401
    BASE_STEPS,
    FMNIST_TRAIN,
    PROMPT,
    _graph,
    _pixels,
    accuracy,
    cached_base,
    pretrain_base,
    split_fmnist,
)
