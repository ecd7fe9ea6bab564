"""Training: the Lightning modules (`LitMDM`, `LitGRPO`), the DataModules, rewards, callbacks and the CLI class.

    python train.py fit --config configs/mdm-shapes.yaml     # the CLI (`mmdlm.training.cli`)
    from mmdlm.training import LitMDM, MDMDataModule         # the same parts from Python
"""

from mmdlm.training.data import ImageDataModule, MDMDataModule, ShardDataModule
from mmdlm.training.module import LitMDM

__all__ = ["ImageDataModule", "LitMDM", "MDMDataModule", "ShardDataModule"]
