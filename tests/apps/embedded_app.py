from gevent import monkey

monkey.patch_all()

# A host Flask app of its own that mounts kcgevent under /kernels (used by tests/test_embed.py).
#
# Run as a script: serves on 127.0.0.1 with a free port, prints {"port", "token"} (one JSON line,
# flushed) on stdout, and on SIGTERM shuts the kernel supervisor down (kernels first) and exits 0.
# Settings come from app.config, filled from KCGEVENT_* environment variables; EMBED_NO_AUTH=1
# switches auth off explicitly. When the supervisor shuts down (POST /shutdown, idle shutdown) the
# host keeps serving and prints "supervisor shut down" on stderr (the on_shutdown callback).
# Monkey patching must come first: the supervisor relays kernels in greenlets.
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402
from flask import Flask, jsonify  # noqa: E402

import kcgevent  # noqa: E402

app = Flask(__name__)
for name, value in os.environ.items():
    if name.startswith("KCGEVENT_"):
        app.config[name] = json.loads(value)


@app.get("/hello")
def hello():
    return jsonify({"hello": "from the host app"})


kernels = kcgevent.KernelSupervisor(app, url_prefix="/kernels", auth=os.environ.get("EMBED_NO_AUTH") != "1",
                                    on_shutdown=lambda: print("supervisor shut down", file=sys.stderr, flush=True))


def main():
    server = WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()
    kernels.start()
    stop = Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    print(json.dumps({"port": server.server_port, "token": kernels.token}), flush=True)
    stop.wait()
    kernels.shutdown()
    server.stop(timeout=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
