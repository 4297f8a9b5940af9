"""laser_ops: the LASER engine library (targets, SVD, interventions, reversible swaps, scoring).

No web imports: the server, sweeps and clients all build on this package.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("laser-serve")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"
