# A host app for gunicorn's gevent worker (used by tests/test_embed.py):
#     gunicorn -c tests/apps/gunicorn_conf.py --pythonpath tests/apps gunicorn_app:app
# The API is mounted under /kernels; its token comes from app.config (KCGEVENT_TOKEN in the environment).
import os
import sys

from flask import Flask, jsonify

import kcgevent

app = Flask(__name__)
app.config["KCGEVENT_TOKEN"] = os.environ["KCGEVENT_TOKEN"]
kernels = kcgevent.KernelSupervisor(app, url_prefix="/kernels",
                                    on_shutdown=lambda: print("supervisor shut down", file=sys.stderr, flush=True))


@app.get("/hello")
def hello():
    return jsonify({"hello": "from gunicorn"})
