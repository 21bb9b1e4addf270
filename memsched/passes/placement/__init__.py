"""Placement: where every storage lives between its uses, chosen by one MIP (OR-Tools).

  problem.py  the words (Gap, Choice, FetchKey), the answer (Placement) and the coefficient
              form both solvers read (PlacementModel): gaps, options, objective, min budget
  greedy.py   the greedy: best relief per second of transfer until every segment fits
  mip.py      the MIP (SCIP): variables, constraints, objective, warm-start hints, decoding;
              ``problem_data`` dumps the formulation
  solve.py    ``solve_placement``: greedy, then the MIP warm-started from it
"""
from .greedy import solve_greedy
from .mip import problem_data, solve_mip
from .problem import (DEVICE, DISK, HOST, KEEP, RECOMPUTE, REFETCH, Choice, FetchKey, Gap, Placement,
                      PlacementModel)
from .solve import solve_placement

__all__ = ["solve_placement", "solve_greedy", "solve_mip", "problem_data", "Placement", "PlacementModel",
           "Gap", "Choice", "FetchKey", "KEEP", "REFETCH", "RECOMPUTE", "HOST", "DISK", "DEVICE"]
