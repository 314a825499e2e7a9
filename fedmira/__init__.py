"""fedmira: federated LoRA fine-tuning of radiology-report language models with Flower.

The command line is :mod:`fedmira.cli` (``fedmira ...`` or ``python -m fedmira ...``); the
library is ``common/``, the apps ``server/`` and ``client/``, the tools on one machine
``simulations/`` (README, Layout).
"""
