"""The app factory and the extension that mounts kcgevent in any Flask app.

    app = Flask(__name__)
    kernels = KernelSupervisor(app, url_prefix="/kernels")   # the API under /kernels
    kernels.token                                           # clients send "Authorization: Bearer <token>"

The host must be served by gevent (gevent.pywsgi.WSGIServer, or gunicorn's
`-k gevent` worker): channels are WebSockets taken over from the WSGI server,
and the kernel relay runs in greenlets.

Auth is on unless switched off explicitly (`auth=False`): without a token one
is generated. Settings may also come from `app.config` (`KCGEVENT_<FIELD>` for
any ServerConfig field, e.g. KCGEVENT_TOKEN, KCGEVENT_IDLE_SHUTDOWN_SECONDS;
KCGEVENT_AUTH, KCGEVENT_URL_PREFIX). The background duties (resource sampling,
idle shutdown) start with `start()` or on the first request; `shutdown()` ends
every kernel and runs at interpreter exit too. After a shutdown (also one asked
for with POST /shutdown, or an idle shutdown) the API answers 503 in JSON.
"""
import atexit
import dataclasses
import logging
import secrets

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from .api.views import bp
from .config import ServerConfig
from .supervisor import Supervisor

log = logging.getLogger(__name__)

SETTING_PREFIX = "KCGEVENT_"


def error_response(status, code, message):
    response = jsonify({"code": code, "message": message})
    response.status_code = status
    return response


class KernelSupervisor:
    """Flask extension: a Supervisor in `app.extensions["kcgevent"]` plus the blueprint."""

    def __init__(self, app=None, config=None, url_prefix=None, supervisor=None, *, auth=True, on_shutdown=None):
        self.config = supervisor.config if supervisor is not None else config or ServerConfig()
        self.url_prefix = url_prefix
        self.auth = auth
        self.supervisor = supervisor  # (made in init_app when not given)
        self._on_shutdown = on_shutdown
        self._started = False
        if app is not None:
            self.init_app(app)

    @property
    def token(self):
        """The bearer token clients must send (None only when auth was switched off)."""
        return self.config.token

    def init_app(self, app):
        self._apply_settings(app.config)
        if self.auth is None:
            pass  # the caller settled the token (create_app for the standalone server)
        elif not self.auth:
            self.config.token = None
            log.warning("kcgevent: authentication is off (auth=False): anyone who can reach %s can run code",
                        self.url_prefix or "the app")
        elif not self.config.token:
            self.config.token = secrets.token_hex(16)
        if self.supervisor is None:
            self.supervisor = Supervisor(self.config)
        if self._on_shutdown is not None:
            self.supervisor.on_shutdown.append(self._on_shutdown)
        app.extensions["kcgevent"] = self.supervisor
        app.extensions["kcgevent_extension"] = self
        app.register_blueprint(bp, url_prefix=self.url_prefix)
        app.before_request(self._before_request)
        if HTTPException not in app.error_handler_spec[None][None]:
            # routing errors (404/405) under our prefix never reach the blueprint's own handlers
            app.register_error_handler(HTTPException, self._routing_error)
        atexit.register(self.shutdown)

    def _apply_settings(self, settings):
        for field in dataclasses.fields(ServerConfig):
            key = SETTING_PREFIX + field.name.upper()
            if key in settings:
                setattr(self.config, field.name, settings[key])
        self.auth = settings.get(SETTING_PREFIX + "AUTH", self.auth)
        self.url_prefix = settings.get(SETTING_PREFIX + "URL_PREFIX", self.url_prefix)

    # -- lifecycle ------------------------------------------------------------------

    def start(self):
        """Start the background duties (resource sampling, idle shutdown); idempotent."""
        if not self._started and not self.supervisor.shutting_down:
            self._started = True
            self.supervisor.start_background()

    def shutdown(self):
        """End every kernel (bounded), remove their files, stop the duties; idempotent."""
        if self.supervisor is not None:
            self.supervisor.shutdown()

    def _ours(self):
        prefix = (self.url_prefix or "").rstrip("/")
        return request.blueprint == bp.name or not prefix or request.path == prefix or \
            request.path.startswith(prefix + "/")

    def _before_request(self):
        if not self._ours():
            return None
        if self.supervisor.shutting_down:
            return error_response(503, "503", "The kernel supervisor has shut down")
        self.start()
        return None

    def _routing_error(self, exc):
        if not self._ours():
            return exc  # the host's page, as Flask would render it
        return error_response(exc.code, str(exc.code), exc.description or exc.name)


def create_app(config=None, supervisor=None):
    """A standalone app serving the API at the root, with JSON errors everywhere.

    With a `config` (or a `supervisor`), its token is used as is (None: no auth, as `--token none` asks).
    """
    app = Flask("kcgevent")
    app.json.sort_keys = False  # keep Kallichore's field order
    settled = config is not None or supervisor is not None
    KernelSupervisor(app, config, supervisor=supervisor, auth=None if settled else True)
    return app
