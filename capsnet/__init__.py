"""capsnet: capsule networks with dynamic routing (Sabour, Frosst & Hinton 2017) in PyTorch.

Layers, bottom up: ``squashing``, ``losses`` and ``conv`` (tensor functions) -> ``routing`` ->
``layers`` -> ``models`` -> ``train``, ``bench``, ``budget``, ``reference``, ``plotting`` -> ``cli``.
``profiles`` (run sizes, and every chapter's sizes) stands below them all; ``display`` (results
tables and source listings for the chapters), ``stats`` (paired tests, verdicts) and ``probe``
(linear read-outs of a representation) stand apart.
``multidigit`` (two overlapping digits) and ``sweeps`` (the recorded experiments) sit beside ``train``.
``data`` (and the toy ``faces``) stand apart and know nothing of models.
Matrix capsules (Hinton, Sabour & Frosst 2018): ``routing_em`` sits beside ``routing``,
``matrix_capsules`` (layers and model) beside ``models``.
"""

from . import budget
from .display import Table, source_listing
from .layers import PrimaryCapsules, RoutingCapsules
from .losses import margin_loss, reconstruction_loss, spread_loss, spread_loss_margin
from .matrix_capsules import (
    ClassMatrixCapsules,
    ConvMatrixCapsules,
    MatrixCapsNet,
    MatrixCapsNetOutput,
    PrimaryMatrixCapsules,
)
from .models import BaselineCNN, CapsNet, CapsNetOutput, Decoder
from .plotting import frames_player, use_book_style
from .profiles import Profile, chapter_sizes, get_profile
from .reference import load_reference
from .routing import dynamic_routing, fixed_couplings
from .routing_em import EMRoutingOutput, em_routing, em_routing_reference, inverse_temperatures
from .routing_reference import dynamic_routing_reference
from .squashing import capsule_length, squash

__version__ = "0.7.3"

__all__ = [
    "BaselineCNN",
    "CapsNet",
    "CapsNetOutput",
    "ClassMatrixCapsules",
    "ConvMatrixCapsules",
    "Decoder",
    "EMRoutingOutput",
    "MatrixCapsNet",
    "MatrixCapsNetOutput",
    "PrimaryCapsules",
    "PrimaryMatrixCapsules",
    "Profile",
    "RoutingCapsules",
    "Table",
    "budget",
    "capsule_length",
    "chapter_sizes",
    "dynamic_routing",
    "dynamic_routing_reference",
    "em_routing",
    "em_routing_reference",
    "fixed_couplings",
    "frames_player",
    "get_profile",
    "inverse_temperatures",
    "load_reference",
    "margin_loss",
    "reconstruction_loss",
    "spread_loss",
    "spread_loss_margin",
    "source_listing",
    "squash",
    "use_book_style",
]
