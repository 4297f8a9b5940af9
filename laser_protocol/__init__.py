"""laser-serve's wire protocol: the request and response models of every route and the config schemas
(interventions, sweeps, datasets), as pydantic models with no torch behind them.

The server builds its routes and its OpenAPI schema from these models, the library (``laser_ops``) reads its
JSON input with them, and the client (``clients``, installable alone as ``laser-serve-client``) parses answers
into them, so the three cannot drift apart. Modules by resource: :mod:`~laser_protocol.interventions`,
:mod:`~laser_protocol.sweeps`, :mod:`~laser_protocol.datasets` (config schemas and dataset routes),
:mod:`~laser_protocol.profiles`, :mod:`~laser_protocol.inference`, :mod:`~laser_protocol.openai`,
:mod:`~laser_protocol.jobs`, :mod:`~laser_protocol.exports`, :mod:`~laser_protocol.spectra`,
:mod:`~laser_protocol.system`, :mod:`~laser_protocol.errors`; shared input checks in
:mod:`~laser_protocol.validation`.
"""

__version__ = "0.1.0"
