"""cekd-losses: mixing augmentation and cross ensemble knowledge distillation for fine-grained classification.

Public API:

- :class:`MixingAugmenter` (``cekd_losses.mixing``), the record :class:`MixedBatch` of a mix
  (``cekd_losses.mixed_batch``), the kernels :func:`mixup`, :func:`cutmix`, :func:`snapmix` and :func:`replay`
  of a mix on another view (``cekd_losses.kernels``), their parameter draws (``cekd_losses.draws``);
- :class:`FeatureTap` (its :meth:`~FeatureTap.cams` reads class activation maps),
  :func:`normalize_cams` and :func:`find_classifier` (``cekd_losses.cam``);
- :func:`soft_cross_entropy`, :class:`SoftTargetCrossEntropy`, :func:`distillation_kl` and
  :class:`CrossDistillationLoss` (``cekd_losses.losses``);
- :class:`CollaborativeEnsemble` and :class:`EnsembleOutput` (``cekd_losses.ensemble``);
- :class:`FeatureFusion`, FFL's fusion module on the members' feature maps (``cekd_losses.fusion``);
- :class:`BranchGate`, ONE's gate over branches (``cekd_losses.gate``);
- :class:`CEKDLoss` and :func:`rampup` (``cekd_losses.objective``);
- :class:`KDLoss` and :class:`CCDLoss`, offline distillation from a fixed teacher (``cekd_losses.offline``);
- :class:`OnlineDistillationLoss`, the objectives of DML, ONE, FFL, PCL and CEKD, its presets
  :data:`METHODS` and :class:`OnlineOutput` (``cekd_losses.online``);
- :func:`train_step` and :class:`StepOutput` (``cekd_losses.step``);
- :class:`SharedTrunk` and :class:`TrunkOutput`: N models as one trunk run once and N branches, and
  :class:`TrunkMember`, one of them whole (``cekd_losses.trunk``);
- :class:`PeerViews`: a random view of the batch for every peer, on its device (``cekd_losses.views``);
- :class:`TemporalMean`, a network's temporal mean model (``cekd_losses.mean_teacher``);
- :class:`PeerContrast`, MCL-OKD's contrastive term between peers with its memory (``cekd_losses.contrastive``);
- :class:`Mixup`, a drop-in for ``timm.data.Mixup`` on this library's kernels (``cekd_losses.timm_mix``);
- :class:`MixUp` and :class:`CutMix`, drop-ins for torchvision's ``transforms.v2.MixUp`` and ``CutMix``
  (``cekd_losses.torchvision_mix``);
- :class:`RandomMixUp`, :class:`RandomCutMix`, :class:`RandomSnapMix` (Kornia augmentations) and
  :func:`kornia_soft_targets` (the package ``cekd_losses.kornia_mix``, one class a module).
"""

from .cam import FeatureTap, find_classifier, normalize_cams
from .contrastive import PeerContrast
from .ensemble import CollaborativeEnsemble, Combine, EnsembleOutput
from .fusion import FeatureFusion
from .gate import BranchGate
from .kernels import cutmix, mixup, replay, snapmix
from .kornia_mix import RandomCutMix, RandomMixUp, RandomSnapMix, kornia_soft_targets
from .losses import CrossDistillationLoss, Reduction, SoftTargetCrossEntropy, distillation_kl, soft_cross_entropy
from .mean_teacher import TemporalMean
from .mixed_batch import MixedBatch
from .mixing import MixingAugmenter, MixMethod
from .objective import CEKDLoss, rampup
from .offline import CCDLoss, KDLoss
from .online import METHODS, MethodTerms, OnlineDistillationLoss, OnlineMethod, OnlineOutput
from .step import StepOutput, train_step
from .timm_mix import Mixup
from .torchvision_mix import CutMix, MixUp
from .trunk import SharedTrunk, TrunkMember, TrunkOutput
from .views import PeerViews

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "BranchGate",
    "CCDLoss",
    "CEKDLoss",
    "CollaborativeEnsemble",
    "Combine",
    "CrossDistillationLoss",
    "CutMix",
    "EnsembleOutput",
    "FeatureFusion",
    "FeatureTap",
    "KDLoss",
    "MixMethod",
    "MixUp",
    "MixedBatch",
    "Mixup",
    "PeerViews",
    "RandomCutMix",
    "RandomMixUp",
    "RandomSnapMix",
    "MixingAugmenter",
    "MethodTerms",
    "OnlineDistillationLoss",
    "OnlineMethod",
    "OnlineOutput",
    "PeerContrast",
    "Reduction",
    "SharedTrunk",
    "SoftTargetCrossEntropy",
    "StepOutput",
    "TemporalMean",
    "TrunkMember",
    "TrunkOutput",
    "__version__",
    "cutmix",
    "distillation_kl",
    "find_classifier",
    "kornia_soft_targets",
    "mixup",
    "normalize_cams",
    "rampup",
    "replay",
    "snapmix",
    "soft_cross_entropy",
    "train_step",
]
