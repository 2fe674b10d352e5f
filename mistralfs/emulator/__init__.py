"""A local emulator of Mistral AI's Files API, for tests, demos and benchmarks.

See :mod:`mistralfs.emulator.app` for the routes and
:mod:`mistralfs.emulator.server` for :class:`EmulatorConfig`, :func:`serve`
and :func:`run`.
"""

from mistralfs.emulator.config import EmulatorConfig
from mistralfs.emulator.server import create_app, run, serve

__all__ = ["EmulatorConfig", "create_app", "run", "serve"]
