from gevent import monkey

monkey.patch_all()

# A host Flask app of its own that mounts kcgevent under /kernels (used by tests/test_embed.py).
#
# Run as a script: serves on 127.0.0.1 with a free port, prints the port (one line, flushed) on
# stdout, and on SIGTERM shuts the kernel supervisor down (kernels first) and exits 0.
# Monkey patching must come first: the supervisor relays kernels in greenlets.
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402
from flask import Flask, jsonify  # noqa: E402

import kcgevent  # noqa: E402

app = Flask(__name__)


@app.get("/hello")
def hello():
    return jsonify({"hello": "from the host app"})


kcgevent.KernelSupervisor(app, config=kcgevent.ServerConfig(token=None), url_prefix="/kernels")


def main():
    server = WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()
    stop = Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    print(server.server_port, flush=True)
    stop.wait()
    app.extensions["kcgevent"].shutdown()
    server.stop(timeout=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
