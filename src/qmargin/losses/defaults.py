"""The loss hyper-parameters a run gets when it does not set them (one home; read at resolution time).

:func:`qmargin.training.resolve_defaults` fills them into a config's ``loss_kwargs`` through the loss
registry, which reads this module's attributes when it resolves, so a program may set them (e.g.
``qmargin.losses.defaults.DEFAULT_MCEL_MARGIN = 10.0``) before it builds its configs.
"""

__all__ = ["DEFAULT_MCEL_MARGIN", "DEFAULT_MCEL_BOUND", "DEFAULT_MHL_B"]

# Set by the ablation (docs/results/mcel_ablation.md, `qmargin reproduce mcel-ablation`): the most robust
# (bound, margin) on mnist5k at 2 and 4 bits whose clean accuracy stays within 1 point of CE.
DEFAULT_MCEL_MARGIN: float = 30.0
DEFAULT_MCEL_BOUND: float = 30.0
# MHL's hinge b when a training config does not set it (the value runs have always used).
DEFAULT_MHL_B: float = 1.0
