"""Feature engineering: modules that turn market events into the named floats a policy sees.

Add a module by dropping a file in this package that defines a :class:`FeatureModule`
decorated with ``@register_feature_module("name")``, then name it in
:class:`FeatureEngineConfig`; the registry imports this package's files on first use.
"""

from bot.features.base import FeatureModule, register_feature_module
from bot.features.engine import FeatureEngine, FeatureEngineConfig, FeatureModuleSpec, build_feature_engine

__all__ = [
    "FeatureEngine",
    "FeatureEngineConfig",
    "FeatureModule",
    "FeatureModuleSpec",
    "build_feature_engine",
    "register_feature_module",
]
