"""MixUp, CutMix and SnapMix as Kornia augmentations, running this library's draws and kernels.

For pipelines built from ``kornia.augmentation`` modules: :class:`RandomMixUp` and :class:`RandomCutMix` are
drop-ins for Kornia's ``RandomMixUpV2`` and ``RandomCutMixV2`` (the same constructor conventions, call
``aug(images, labels) -> [images, labels]`` with ``data_keys=["input", "class"]``, the same label layout and
meaning, parameter replay through ``params=``), and :class:`RandomSnapMix` adds SnapMix, which Kornia lacks.

They are built as Kornia's mix classes are: a parameter generator (a Kornia ``RandomGeneratorBase`` that
returns a dict of named tensors, here from :func:`~cekd_losses.draws.draw_parameters`), the pixels in
``apply_transform`` and the label rows in ``apply_transform_class`` / ``apply_non_transform_class``. Four of
Kornia's methods are overridden, each to avoid one cost (their docstrings say which); no value is read back to
the host.

Label layouts, one row per image:

- :class:`RandomMixUp`: (B, 3) ``[label, partner label, lam]``; the image is ``(1 - lam) x + lam x[partner]``.
- :class:`RandomCutMix`: (1, B, 3) ``[label, partner label, lam]`` with ``lam`` the partner's pixel share
  (Kornia's ``use_correct_lambda=False`` meaning; ``use_correct_lambda=True`` gives ``1 - lam``, the image's own
  share), exact for every box.
- :class:`RandomSnapMix`: (B, 4) ``[label, partner label, lam_a, lam_b]``, the two SnapMix weights of the image's
  own label and its partner's, from class activation maps; they need not sum to 1.

:func:`kornia_soft_targets` turns any of these into (B, K) soft targets.
"""

from __future__ import annotations

from .cutmix import RandomCutMix
from .mixup import RandomMixUp
from .snapmix import RandomSnapMix
from .soft_targets import kornia_soft_targets

__all__ = ["RandomCutMix", "RandomMixUp", "RandomSnapMix", "kornia_soft_targets"]
