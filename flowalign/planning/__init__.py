"""Memory planning: published model configurations, exact parameter counts and predicted peak memory.

``architectures`` holds the configurations, ``activations`` the per-block activation formulas,
``memory`` the planner (:func:`memory.plan`, :func:`memory.suggest`), ``command`` the ``plan`` command
and ``trace`` the saved-tensor counter the formulas are checked against.
"""

from flowalign.planning.memory import Plan, Recipe, plan, suggest

__all__ = ["Plan", "Recipe", "plan", "suggest"]
