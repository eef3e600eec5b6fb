"""cekd-losses: mixing augmentation and cross ensemble knowledge distillation for fine-grained classification.

Public API:

- :class:`MixingAugmenter`, :class:`MixedBatch` and the kernels :func:`mixup`, :func:`cutmix`,
  :func:`snapmix` (``cekd_losses.mixing``);
- :func:`class_activation_maps`, :func:`normalize_cams` and :class:`FeatureTap` (``cekd_losses.cam``).
"""

from .cam import FeatureTap, class_activation_maps, normalize_cams
from .mixing import MixedBatch, MixingAugmenter, MixMethod, cutmix, mixup, snapmix

__version__ = "0.1.0"

__all__ = [
    "FeatureTap",
    "MixMethod",
    "MixedBatch",
    "MixingAugmenter",
    "__version__",
    "class_activation_maps",
    "cutmix",
    "mixup",
    "normalize_cams",
    "snapmix",
]
