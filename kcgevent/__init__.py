"""kcgevent: a durable, headless supervisor for Jupyter kernels, wire-compatible with Kallichore.

Attributes are imported lazily so that `python -m kcgevent` can patch the
standard library for gevent before anything else is imported.
"""
__version__ = "0.1.0"  # this package's own version (setup.py reads it); config.VERSION is the API's

__all__ = ["KernelSupervisor", "ServerConfig", "VERSION", "create_app"]


def __getattr__(name):
    if name in ("KernelSupervisor", "create_app"):
        from . import app
        return getattr(app, name)
    if name in ("ServerConfig", "VERSION"):
        from . import config
        return getattr(config, name)
    raise AttributeError(name)
