"""recon-attack: how much of a private image leaks from the tensor a split-inference device sends.

The command line is `python main.py ...` (or `recon-attack ...`); in Python, the three calls below and the parts of
the configuration they take (docs/api.md)."""
from .api import Evaluation, cut, evaluate_attack, train_attacker
from .config import (AttackPlan, Config, DataConfig, DecoderSpec, DefenceConfig, Derived, NoiseConfig, TrainConfig,
                     VictimConfig)
from .train import TrainedAttack

__all__ = ['cut', 'train_attacker', 'evaluate_attack', 'Evaluation', 'TrainedAttack', 'AttackPlan', 'Config',
           'DataConfig', 'DecoderSpec', 'DefenceConfig', 'Derived', 'NoiseConfig', 'TrainConfig', 'VictimConfig']
