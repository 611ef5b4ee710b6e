"""The OpenAPI document the server serves at /openapi.json: kallichore.json exactly as shipped.

A client generated from the served document is the client generated from the shipped one. (The
test suite renders the API from the views and the marshmallow schemas, tests/openapi_render.py, and
checks that the rendering matches kallichore.json, so the contract and the code cannot drift apart.)
"""
import copy
import functools
import json
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
# Installed: the copy setup.py puts in the package. Source checkout: the file at the top.
SHIPPED = (os.path.join(_HERE, "kallichore.json"), os.path.join(_HERE, os.pardir, os.pardir, "kallichore.json"))


@functools.cache
def _shipped():
    for path in SHIPPED:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
    raise FileNotFoundError(f"kallichore.json is not shipped with this installation (looked in {SHIPPED})")


def shipped_openapi(url_prefix=""):
    """kallichore.json, exactly as shipped (plus `servers` when mounted under a prefix)."""
    doc = _shipped()
    if url_prefix:
        doc = copy.copy(doc)
        doc["servers"] = [{"url": url_prefix}]
    return doc
