"""Render the OpenAPI document of the API from what the Flask app really serves (tests only).

The paths come from the app's URL rules, the operations from the `operation`
metadata on each view (kcgevent.api.contract) and the bodies from the generated
marshmallow schemas. tests/test_contract.py compares the result with
kallichore.json, so the contract and the code cannot drift apart silently.
"""
import re
from http import HTTPStatus

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from kcgevent.api.schemas import SCHEMAS

TITLE = "Kallichore API"
API_VERSION = "1.0.0"
OPENAPI_VERSION = "3.0.1"
BEARER = {"bearerAuth": []}
IGNORED_METHODS = {"HEAD", "OPTIONS"}

# `<session_id>` or `<string:session_id>` -> (converter, name)
_RULE_ARG = re.compile(r"<(?:(?P<converter>[^:<>]+):)?(?P<name>[^<>]+)>")
_PARAM_TYPES = {"int": "integer", "float": "number"}


def render_openapi(app, blueprint_name="kallichore", url_prefix=None):
    """Return the OpenAPI document (a dict) for the views of one blueprint.

    `url_prefix` is where the blueprint is mounted; it is stripped so a mounted
    API renders the same paths as a standalone one (and is reported under
    `servers`). When None it is guessed as the path prefix shared by all of
    the blueprint's rules: our routes have no common first segment.
    """
    rules = [
        (rule, app.view_functions[rule.endpoint])
        for rule in app.url_map.iter_rules()
        if rule.endpoint.startswith(blueprint_name + ".")
    ]
    if url_prefix is None:
        url_prefix = _common_prefix([rule.rule for rule, _ in rules])
    url_prefix = url_prefix.rstrip("/")

    names = {cls: name for name, cls in SCHEMAS.items()}
    spec = APISpec(
        title=TITLE,
        version=API_VERSION,
        openapi_version=OPENAPI_VERSION,
        plugins=[MarshmallowPlugin(schema_name_resolver=lambda schema: _schema_name(schema, names))],
        servers=[{"url": url_prefix}] if url_prefix else [],
    )
    spec.components.security_scheme("bearerAuth", {"type": "http", "scheme": "bearer"})
    for name, cls in SCHEMAS.items():  # generated in dependency order
        spec.components.schema(name, schema=cls)

    paths = {}
    for rule, view in sorted(rules, key=lambda item: item[0].rule):
        op = getattr(view, "operation", None)
        if op is None:  # e.g. the /openapi.json view itself
            continue
        path, params = _openapi_path(rule.rule.removeprefix(url_prefix))
        for method in sorted(rule.methods - IGNORED_METHODS):
            paths.setdefault(path, {})[method.lower()] = _operation(op, params)
    for path, operations in paths.items():
        spec.path(path=path, operations=operations)
    return spec.to_dict()


def _schema_name(schema, names):
    cls = schema if isinstance(schema, type) else type(schema)
    return names.get(cls, cls.__name__.removesuffix("Schema"))


def _common_prefix(rules):
    """The longest run of leading path segments shared by every rule."""
    if not rules:
        return ""
    split = [rule.strip("/").split("/") for rule in rules]
    prefix = []
    for segments in zip(*split):
        if len(set(segments)) != 1 or "<" in segments[0]:
            break
        prefix.append(segments[0])
    # a rule that *is* the prefix (e.g. a lone `/status`) is a route, not a mount point
    if any(len(s) == len(prefix) for s in split):
        prefix = prefix[:-1]
    return "/" + "/".join(prefix) if prefix else ""


def _openapi_path(rule):
    """Flask `/sessions/<session_id>` -> OpenAPI `/sessions/{session_id}` plus its parameters."""
    params = [
        {
            "name": m["name"],
            "in": "path",
            "required": True,
            "schema": {"type": _PARAM_TYPES.get(m["converter"], "string")},
        }
        for m in _RULE_ARG.finditer(rule)
    ]
    return _RULE_ARG.sub(lambda m: "{%s}" % m["name"], rule) or "/", params


def _schema_for(kind):
    """A response/body `kind` from the contract -> what apispec expects."""
    if kind == "any":
        return {}
    if kind in ("string", "object"):
        return {"type": kind}
    if kind.endswith("[]"):  # an array of a component, e.g. "executionHistoryEntry[]"
        return {"type": "array", "items": SCHEMAS[kind[:-2]]}
    return SCHEMAS[kind]


def _operation(op, params):
    operation = {"operationId": op.operation_id, "summary": op.summary}
    if params:
        operation["parameters"] = params
    if op.body:
        operation["requestBody"] = {
            "required": op.body_required,
            "content": {"application/json": {"schema": _schema_for(op.body)}},
        }
    responses = {}
    for code, kind in sorted(op.responses.items(), key=lambda item: int(item[0])):
        response = {"description": HTTPStatus(int(code)).phrase}
        if kind is not None:
            response["content"] = {"application/json": {"schema": _schema_for(kind)}}
        responses[str(code)] = response
    operation["responses"] = responses
    operation["security"] = [BEARER] if op.auth else []
    if op.tags:
        operation["tags"] = list(op.tags)
    return operation
