"""beamloop's edge service: pipeline, kernels, atom finding, control bridge, simulator and CLI.

Start at :mod:`beamloop.edge.path`, which lists the stages a frame goes through.
"""

__version__ = "0.1.0"
