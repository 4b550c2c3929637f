"""tlcourse: the helper package of an open course on transfer learning.

The notebooks tell the story; these small modules keep the code they share:

- :mod:`tlcourse.env`      profile (quick/full), device, seeding, environment report
- :mod:`tlcourse.download` checksummed, atomic, retried downloads
- :mod:`tlcourse.datasets` the dataset registry, image folders, bundled datasets
- :mod:`tlcourse.models`   pretrained backbones (offline EfficientNet-Lite0), ImageNet labels
- :mod:`tlcourse.train`    the training / evaluation loop every chapter uses
- :mod:`tlcourse.features` feature extraction, caching, linear probes (chapter 01)
- :mod:`tlcourse.finetune` layer groups, unfreezing, layer-wise LRs, BatchNorm helpers (chapter 02)
- :mod:`tlcourse.digits`   digit domains: SynDigits, scikit-learn digits, MNIST-M-style blends (chapter 03)
- :mod:`tlcourse.adapt`    domain adaptation: DANN, CORAL, MMD, AdaBN, self-training, benchmark (chapter 03)
- :mod:`tlcourse.distill`  knowledge distillation: KD loss with temperature, hints, the loop (chapter 04)
- :mod:`tlcourse.multitask` overlapping digits, shared backbone + heads, uncertainty weighting, PCGrad (chapter 05)
- :mod:`tlcourse.efficient` LoRA (through peft), BitFit: train a sliver, save kilobytes (chapter 06)
- :mod:`tlcourse.robust`   LP-FT's start, WiSE-FT interpolation, model soups, Tent (chapter 06)
- :mod:`tlcourse.shift`    ImageNet-C-style corruptions of any image batch, by severity and seed (chapter 06)
- :mod:`tlcourse.text`     a pretrained sentence encoder offline, masked mean pooling, cached embeddings (chapter 07)
- :mod:`tlcourse.viz`      learning curves and image grids
- :mod:`tlcourse.notebooks` headless notebook execution, Colab badges and setup cells
- :mod:`tlcourse.cli`      the ``tlcourse`` command

Importing :mod:`tlcourse` itself is cheap (no torch): ``python -m tlcourse.bootstrap``
must run on a bare Python before anything is installed.
"""

__version__ = "0.1.0"
