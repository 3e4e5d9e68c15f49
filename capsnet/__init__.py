"""capsnet: capsule networks with dynamic routing (Sabour, Frosst & Hinton 2017) in PyTorch.

Layers, bottom up: ``squashing`` and ``losses`` (tensor functions) -> ``routing`` ->
``layers`` -> ``models`` -> ``train``, ``bench``, ``reference``, ``plotting`` -> ``cli``.
``data`` (and the toy ``faces``) stand apart and know nothing of models.
"""

from .layers import PrimaryCapsules, RoutingCapsules
from .losses import margin_loss, reconstruction_loss
from .models import BaselineCNN, CapsNet, CapsNetOutput, Decoder
from .plotting import use_book_style
from .profiles import Profile, get_profile
from .reference import load_reference
from .routing import dynamic_routing, fixed_couplings
from .routing_reference import dynamic_routing_reference
from .squashing import capsule_length, squash

__version__ = "0.1.0"

__all__ = [
    "BaselineCNN",
    "CapsNet",
    "CapsNetOutput",
    "Decoder",
    "PrimaryCapsules",
    "Profile",
    "RoutingCapsules",
    "capsule_length",
    "dynamic_routing",
    "dynamic_routing_reference",
    "fixed_couplings",
    "get_profile",
    "load_reference",
    "margin_loss",
    "reconstruction_loss",
    "squash",
    "use_book_style",
]
