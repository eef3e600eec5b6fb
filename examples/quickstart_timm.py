"""CEKD in a few lines with timm models: a resnet18 and a mobilenetv3 on SnapMix batches.

SnapMix weighs labels by class activation maps, read by a FeatureTap from a no-grad forward of member 0
(train_step runs it; BatchNorm runs in eval mode for it here, see FeatureTap.cams).

    python examples/quickstart_timm.py [--steps 5]
"""

import argparse

import timm
import torch

from cekd_losses import CEKDLoss, CollaborativeEnsemble, FeatureTap, MixingAugmenter, train_step

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=5)
steps = parser.parse_args().steps

num_classes = 10
members = [
    timm.create_model(name, pretrained=False, num_classes=num_classes) for name in ("resnet18", "mobilenetv3_small_100")
]
ensemble = CollaborativeEnsemble(members)
tap = FeatureTap(members[0])
mixer = MixingAugmenter("snapmix", num_classes, mix_alpha=5.0)
criterion = CEKDLoss(temperature=3.0, rampup_steps=100)
optimizer = torch.optim.AdamW(ensemble.parameters(), lr=1e-3)

for step in range(steps):
    images, labels = torch.rand(8, 3, 64, 64), torch.randint(0, num_classes, (8,))  # your data loader here
    out = train_step(ensemble, criterion, images, labels, mixer=mixer, tap=tap, step=step, eval_mode_cams=True)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    print(f"step {step}: " + ", ".join(f"{name} {value.item():.3f}" for name, value in out.parts.items()))
