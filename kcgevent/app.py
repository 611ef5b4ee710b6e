"""The app factory and the extension that mounts kcgevent in any Flask app.

    app = Flask(__name__)
    KernelSupervisor(app, url_prefix="/kernels")   # the API under /kernels

The host must be served by gevent (gevent.pywsgi.WSGIServer or a gevent
worker): channels are WebSockets taken over from the WSGI server, and the
kernel relay runs in greenlets.
"""
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from .api.views import bp
from .config import ServerConfig
from .supervisor import Supervisor


class KernelSupervisor:
    """Flask extension: a Supervisor in `app.extensions["kcgevent"]` plus the blueprint."""

    def __init__(self, app=None, config=None, url_prefix=None, supervisor=None):
        self.supervisor = supervisor or Supervisor(config or ServerConfig())
        self.url_prefix = url_prefix
        if app is not None:
            self.init_app(app)

    def init_app(self, app):
        app.extensions["kcgevent"] = self.supervisor
        app.register_blueprint(bp, url_prefix=self.url_prefix)


def create_app(config=None, supervisor=None):
    """A standalone app serving the API at the root, with JSON errors everywhere."""
    app = Flask("kcgevent")
    app.json.sort_keys = False  # keep Kallichore's field order
    KernelSupervisor(app, config, supervisor=supervisor)

    @app.errorhandler(HTTPException)
    def http_error(exc):
        response = jsonify({"code": str(exc.code), "message": exc.description or exc.name})
        response.status_code = exc.code
        return response

    @app.errorhandler(Exception)
    def internal_error(exc):
        app.logger.exception("unhandled error")
        response = jsonify({"code": "500", "message": f"Internal server error: {type(exc).__name__}: {exc}"})
        response.status_code = 500
        return response

    return app
