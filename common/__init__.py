"""fedmira core library: plain PyTorch / Transformers / PEFT code with no Flower imports.

Everything a hospital needs to read reports, build prompts, load a model, LoRA-fine-tune it and
generate impressions lives here as functions with explicit arguments, so that the Flower apps in
``client/`` and ``server/`` stay thin and the same code runs centralized, simulated or deployed.
"""

__version__ = "0.1.0"
