"""CEKD in a few lines with torchvision models: two resnet18 trained together on CutMix batches.

python examples/quickstart_torchvision.py [--steps 5]
"""

import argparse

import torch
import torchvision

from cekd_losses import CEKDLoss, CollaborativeEnsemble, MixingAugmenter, train_step

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=5)
steps = parser.parse_args().steps

num_classes = 10
ensemble = CollaborativeEnsemble([torchvision.models.resnet18(num_classes=num_classes) for _ in range(2)])
mixer = MixingAugmenter("cutmix", num_classes, mix_alpha=1.0, p=0.5)
criterion = CEKDLoss(temperature=3.0, alpha=1.0, beta=1.0)
optimizer = torch.optim.SGD(ensemble.parameters(), lr=0.01, momentum=0.9)

for step in range(steps):
    images, labels = torch.rand(8, 3, 64, 64), torch.randint(0, num_classes, (8,))  # your data loader here
    out = train_step(ensemble, criterion, images, labels, mixer=mixer, step=step)  # mix, forward, loss
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    print(f"step {step}: " + ", ".join(f"{name} {value.item():.3f}" for name, value in out.parts.items()))

single_model = ensemble.member(0)  # export any member, or use ensemble.predict(images)
