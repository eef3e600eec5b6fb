"""cekd-losses: mixing augmentation and cross ensemble knowledge distillation for fine-grained classification.

Public API:

- :class:`MixingAugmenter`, :class:`MixedBatch` and the kernels :func:`mixup`, :func:`cutmix`,
  :func:`snapmix` (``cekd_losses.mixing``);
- :func:`class_activation_maps`, :func:`normalize_cams` and :class:`FeatureTap` (``cekd_losses.cam``);
- :func:`soft_cross_entropy`, :class:`SoftTargetCrossEntropy`, :func:`distillation_kl` and
  :class:`CrossDistillationLoss` (``cekd_losses.losses``);
- :class:`CollaborativeEnsemble` and :class:`EnsembleOutput` (``cekd_losses.ensemble``);
- :class:`CEKDLoss` and :func:`rampup` (``cekd_losses.objective``).
"""

from .cam import FeatureTap, class_activation_maps, normalize_cams
from .ensemble import CollaborativeEnsemble, Combine, EnsembleOutput
from .losses import CrossDistillationLoss, Reduction, SoftTargetCrossEntropy, distillation_kl, soft_cross_entropy
from .mixing import MixedBatch, MixingAugmenter, MixMethod, cutmix, mixup, snapmix
from .objective import CEKDLoss, rampup

__version__ = "0.1.0"

__all__ = [
    "CEKDLoss",
    "CollaborativeEnsemble",
    "Combine",
    "CrossDistillationLoss",
    "EnsembleOutput",
    "FeatureTap",
    "MixMethod",
    "MixedBatch",
    "MixingAugmenter",
    "Reduction",
    "SoftTargetCrossEntropy",
    "__version__",
    "class_activation_maps",
    "cutmix",
    "distillation_kl",
    "mixup",
    "normalize_cams",
    "rampup",
    "snapmix",
    "soft_cross_entropy",
]
