"""The `operation` decorator: one place that says what a view accepts and answers.

The metadata it records is used twice: at run time (auth, body validation) by
`kcgevent.api.views`, and by the tests (tests/openapi_render.py) to render the OpenAPI
document that a test compares with `kallichore.json`.
"""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Operation:
    """What one HTTP operation promises, in OpenAPI terms.

    `body` and the values of `responses` name components of kallichore.json
    (e.g. "newSession", "error"); a response value of None means "no schema"
    (an empty or `null` body), "any" means an unconstrained JSON value,
    "string" / "object" mean an inline schema of that JSON type, and "name[]" an
    array of component `name`.
    """

    operation_id: str
    summary: str
    responses: dict
    body: str | None = None
    body_required: bool = False
    auth: bool = True
    tags: tuple = field(default=())


def operation(operation_id, summary, *, responses, body=None, body_required=False, auth=True):
    """Attach an `Operation` to a view function (read back via `view.operation`)."""

    def decorate(view):
        view.operation = Operation(operation_id, summary, dict(responses), body, body_required, auth)
        return view

    return decorate
