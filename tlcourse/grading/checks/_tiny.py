"""A miniature timm EfficientNet for the chapter 01/02 checks.

Same parts and API as timm's (``conv_stem``, ``bn1``, ``blocks`` of stages, ``conv_head``,
``bn2``, ``global_pool``, ``classifier``, ``get_classifier``/``reset_classifier``,
``num_features``) in plain torch, so grading never imports timm (seconds per question).
"""

import torch
from torch import nn
from torch.nn import functional as F


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm followed by ReLU6, a BatchNorm2d subclass, as timm's layer of this name."""

    def forward(self, x):
        return F.relu6(super().forward(x))


class Block(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = BatchNormAct2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class TinyEfficientNet(nn.Module):
    """conv_stem, bn1, blocks (stages of blocks), conv_head, bn2, global_pool, [drop,] classifier.

    ``dropout``: a dropout layer before the classifier, as in timm (``None``: none).
    """

    def __init__(self, num_classes=5, num_features=24, widths=(8, 12, 16, 20), depths=(1, 2, 2, 1), seed=0,
                 dropout=None):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # reproducible weights, global RNG untouched
            torch.manual_seed(seed)
            self.conv_stem = nn.Conv2d(3, widths[0], 3, 2, 1, bias=False)
            self.bn1 = BatchNormAct2d(widths[0])
            stages, cin = [], widths[0]
            for i, (w, d) in enumerate(zip(widths, depths)):
                stages.append(nn.Sequential(*[Block(cin if j == 0 else w, w, 2 if (j == 0 and i) else 1)
                                              for j in range(d)]))
                cin = w
            self.blocks = nn.Sequential(*stages)
            self.conv_head = nn.Conv2d(cin, num_features, 1, bias=False)
            self.bn2 = BatchNormAct2d(num_features)
            self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
            if dropout is not None:
                self.drop = nn.Dropout(dropout)
            self.num_features, self.num_classes = num_features, num_classes
            self.classifier = nn.Linear(num_features, num_classes) if num_classes else nn.Identity()

    def get_classifier(self):
        return self.classifier

    def reset_classifier(self, num_classes):
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x):
        x = self.global_pool(self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x))))))
        if hasattr(self, "drop"):
            x = self.drop(x)
        return self.classifier(x)
