"""CEKD in a few lines with timm models: a resnet18 and a mobilenetv3 on SnapMix batches.

SnapMix weighs labels by class activation maps, read by a FeatureTap from member 0's forward.

    python examples/quickstart_timm.py [--steps 5]
"""

import argparse

import timm
import torch

from cekd_losses import CEKDLoss, CollaborativeEnsemble, FeatureTap, MixingAugmenter

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=5)
steps = parser.parse_args().steps

num_classes = 10
members = [timm.create_model(name, pretrained=False, num_classes=num_classes)
           for name in ("resnet18", "mobilenetv3_small_100")]
ensemble = CollaborativeEnsemble(members)
tap = FeatureTap(members[0])
mixer = MixingAugmenter("snapmix", num_classes, alpha=5.0)
criterion = CEKDLoss(temperature=3.0, rampup_steps=100)
optimizer = torch.optim.AdamW(ensemble.parameters(), lr=1e-3)

for step in range(steps):
    images, labels = torch.rand(8, 3, 64, 64), torch.randint(0, num_classes, (8,))  # your data loader here
    with torch.no_grad():
        members[0](images)  # the tap captures the clean images' feature maps
    batch = mixer(images, labels, cams=tap.class_activation_maps(labels))
    loss = criterion(ensemble(batch.images), batch.targets, step=step)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step}: loss {loss.item():.3f}")
