"""Time grids, stateless flow samplers and guidance transforms."""

from flowalign.models.schedules import flux_time_grid, scheduler_time_grid, uniform_time_grid
from flowalign.sampling.samplers import (
    VelocityFn,
    get_sampler,
    sample_euler,
    sample_heun,
    sample_one_step,
)

__all__ = [
    "VelocityFn",
    "flux_time_grid",
    "get_sampler",
    "sample_euler",
    "sample_heun",
    "sample_one_step",
    "scheduler_time_grid",
    "uniform_time_grid",
]
