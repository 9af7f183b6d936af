"""Policies: an observation in, a target exposure per traded instrument out.

Load one with :func:`load_policy` from a ``NAME[:PATH]`` spec; register a new one by
dropping a module here with a loader decorated by ``@register_policy("name")``.
"""

from strategies.base import Observation, Policy, load_policy, register_policy

__all__ = ["Observation", "Policy", "load_policy", "register_policy"]
