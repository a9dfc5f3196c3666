"""Monotone operator equilibrium networks (MonDEQ): parameterizations, splitting solvers, implicit
backward, classifier, checkpoint importers and quantization certificates (design.md §5).

Imports only ``qmargin.quant`` / ``qmargin.faults`` / ``qmargin.errors`` of qmargin.
"""

from qmargin.deq.certificates import (
    BitErrorCertificate,
    BitFlipCertificate,
    Certificate,
    DisplacementBound,
    SolverRates,
    bit_flip_perturbation_bounds,
    certify,
    certify_under_bit_errors,
    code_bit_deltas,
    conv_frequency_blocks,
    displacement_bound,
    fb_rate,
    lipschitz_constant,
    max_certified_bit_flips,
    monotonicity_margin,
    pr_rate,
    residual_error_bound,
    solver_rates,
    spectral_norm,
    sym_max_eigenvalue,
)
from qmargin.deq.classifier import MonDEQClassifier
from qmargin.deq.importers import (
    detect_format,
    load_companion_2026,
    load_mondeq_checkpoint,
    load_reference_2020,
    read_state_dict,
)
from qmargin.deq.layer import MonDEQLayer, implicit_equilibrium
from qmargin.deq.monotone import (
    MonotoneConv,
    MonotoneLinear,
    MonotoneMultiConv,
    MonotoneParameterization,
    assemble_fc_W,
)
from qmargin.deq.operators import (
    ConvOperator,
    DenseOperator,
    blocks_margin_and_norm,
    conv_blocks,
    dense_margin_and_norm,
)
from qmargin.deq.solvers import (
    ConvergenceError,
    SolverStats,
    default_alpha,
    fixed_point_residual,
    solve,
    solve_adjoint,
)

__all__ = [
    "monotonicity_margin",
    "lipschitz_constant",
    "spectral_norm",
    "sym_max_eigenvalue",
    "conv_frequency_blocks",
    "Certificate",
    "certify",
    "SolverRates",
    "solver_rates",
    "fb_rate",
    "pr_rate",
    "DisplacementBound",
    "displacement_bound",
    "residual_error_bound",
    "code_bit_deltas",
    "bit_flip_perturbation_bounds",
    "BitFlipCertificate",
    "max_certified_bit_flips",
    "BitErrorCertificate",
    "certify_under_bit_errors",
    "MonotoneParameterization",
    "MonotoneLinear",
    "MonotoneConv",
    "MonotoneMultiConv",
    "assemble_fc_W",
    "DenseOperator",
    "ConvOperator",
    "conv_blocks",
    "dense_margin_and_norm",
    "blocks_margin_and_norm",
    "SolverStats",
    "ConvergenceError",
    "default_alpha",
    "fixed_point_residual",
    "solve",
    "solve_adjoint",
    "MonDEQLayer",
    "implicit_equilibrium",
    "MonDEQClassifier",
    "read_state_dict",
    "detect_format",
    "load_reference_2020",
    "load_companion_2026",
    "load_mondeq_checkpoint",
]
