"""Training methods (algorithms) over roles and an adapter; no model family is imported here.

Importing this package registers the built-in methods (``dmd2``, ``finetune``, ``self_forcing``,
``ode_init``) with the registry.
"""
from .adapter import LATENT_SOURCES, Adapter, CausalAdapter, PreparedBatch
from .base import SamplingSpec, TrainingMethod, flow_matching_loss
from .dmd2 import DMD2Config, DMD2Method, dmd_gradient, dmd_loss
from .finetune import FinetuneConfig, FinetuneMethod
from .ode_init import OdeInitConfig, OdeInitMethod
from .self_forcing import RolloutPlan, SelfForcingConfig, SelfForcingMethod
from .registry import available_methods, build_method, get_method_class, register_method
from .roles import EMA, ModelBundle, RoleError, RoleHandle

__all__ = [
    "Adapter", "CausalAdapter", "DMD2Config", "DMD2Method", "EMA", "FinetuneConfig", "FinetuneMethod",
    "LATENT_SOURCES", "ModelBundle", "OdeInitConfig", "OdeInitMethod", "PreparedBatch", "RoleError",
    "RoleHandle", "RolloutPlan", "SamplingSpec", "SelfForcingConfig", "SelfForcingMethod", "TrainingMethod",
    "available_methods", "build_method", "dmd_gradient", "dmd_loss", "flow_matching_loss", "get_method_class",
    "register_method",
]
