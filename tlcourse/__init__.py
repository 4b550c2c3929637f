"""tlcourse: the helper package of an open course on transfer learning.

The notebooks tell the story; these small modules keep the code they share:

- :mod:`tlcourse.env`      profile (quick/full), device, seeding, environment report
- :mod:`tlcourse.download` checksummed, atomic, retried downloads
- :mod:`tlcourse.datasets` the dataset registry, image folders, bundled datasets
- :mod:`tlcourse.models`   pretrained backbones (offline EfficientNet-Lite0), ImageNet labels
- :mod:`tlcourse.train`    the training / evaluation loop every chapter uses
- :mod:`tlcourse.viz`      learning curves and image grids
- :mod:`tlcourse.notebooks` headless notebook execution, Colab badges and setup cells
- :mod:`tlcourse.cli`      the ``tlcourse`` command

Importing :mod:`tlcourse` itself is cheap (no torch): ``python -m tlcourse.bootstrap``
must run on a bare Python before anything is installed.
"""

__version__ = "0.1.0"
