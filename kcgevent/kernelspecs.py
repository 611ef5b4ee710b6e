"""Installed Jupyter kernelspecs (`jupyter kernelspec list`), and sessions made from them.

A NewSession may name a kernelspec (`kernel_name`, our extension). The fields the body leaves out
come from the spec: argv, env, display_name, language, interrupt_mode and protocol_version; an
argv in the body wins (the Kallichore way), the rest of the spec still applies. The resolved spec
is kept in the session's spec as ``kernelspec`` so that a restarted supervisor does not depend on
the kernelspec still being installed.

Discovery is jupyter_client's KernelSpecManager (JUPYTER_PATH, the user and system data dirs, and
the native ipykernel); argv is completed as jupyter_client's KernelManager does it: ``{resource_dir}``
is substituted, and ``python`` / ``python3`` / ``python3.X`` as argv[0] means this interpreter.
"""
import json
import os
import string
import sys
from importlib.metadata import entry_points

from .errors import ApiError

PROVISIONER_GROUP = "jupyter_client.kernel_provisioners"
DEFAULT_PROVISIONER = "local-provisioner"

# What a kernelspec-based body may leave out: the contract's other required fields, as empty.
BODY_DEFAULTS = {"username": "", "input_prompt": "", "continuation_prompt": "", "working_directory": "",
                 "env": []}


class KernelSpecError(ApiError):
    """A kernel_name that names nothing usable: a 400 that says which name."""

    def __init__(self, message):
        super().__init__(400, "400", message)


def _manager():
    from jupyter_client.kernelspec import KernelSpecManager  # imported late: it is slow and optional
    return KernelSpecManager()


def _read_kernel_json(resource_dir):
    """kernel.json as written (KernelSpec drops keys it has no trait for, e.g. kernel_protocol_version)."""
    try:
        with open(os.path.join(resource_dir, "kernel.json"), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(name, resource_dir, spec):
    raw = _read_kernel_json(resource_dir)
    metadata = spec.get("metadata") or {}
    provisioner = metadata.get("kernel_provisioner")
    return {
        "name": name,
        "resource_dir": resource_dir,
        "argv": list(spec.get("argv") or []),
        "env": dict(spec.get("env") or {}),
        "display_name": spec.get("display_name") or name,
        "language": spec.get("language") or "",
        "interrupt_mode": spec.get("interrupt_mode") or "signal",  # the kernelspec default (jupyter_client)
        "kernel_protocol_version": raw.get("kernel_protocol_version"),
        "metadata": metadata,
        "provisioner": provisioner_of(provisioner) if provisioner is not None else None,
    }


def provisioner_of(entry):
    """`metadata.kernel_provisioner` -> {name, config}, with jupyter_client's defaults."""
    entry = entry if isinstance(entry, dict) else {}
    name = entry.get("provisioner_name") or os.environ.get("JUPYTER_DEFAULT_PROVISIONER_NAME") \
        or DEFAULT_PROVISIONER
    return {"name": name, "config": dict(entry.get("config") or {})}


def _spec_dirs():
    """name -> resource dir, as jupyter_client finds them (the first kernel dir wins), but keeping
    kernelspecs whose provisioner is not registered: KernelSpecManager hides those, and then
    nobody can tell the user why their kernel is missing."""
    manager = _manager()
    found = {}
    for kernel_dir in manager.kernel_dirs:
        try:
            names = sorted(os.listdir(kernel_dir))
        except OSError:
            continue
        for name in names:
            path = os.path.join(kernel_dir, name)
            if os.path.isfile(os.path.join(path, "kernel.json")):
                found.setdefault(name.lower(), path)
    for name, path in manager.find_kernel_specs().items():  # adds the native kernel (ipykernel)
        found.setdefault(name, path)
    return found


def _load(name, resource_dir):
    from jupyter_client.kernelspec import KernelSpec
    return _describe(name, resource_dir, KernelSpec.from_resource_dir(resource_dir).to_dict())


def find_all():
    """Every installed kernelspec, by name (sorted); unreadable ones are left out."""
    specs = {}
    for name, resource_dir in sorted(_spec_dirs().items()):
        try:
            specs[name] = _load(name, resource_dir)
        except (OSError, ValueError, TypeError):
            continue
    return specs


def find(name):
    """One kernelspec by name; KernelSpecError naming it when there is none."""
    resource_dir = _spec_dirs().get(name.lower())
    if resource_dir is None:
        raise KernelSpecError(f"No kernelspec named '{name}' is installed (see `kcgevent kernelspecs`)")
    try:
        return _load(name, resource_dir)
    except (OSError, ValueError, TypeError) as exc:
        raise KernelSpecError(f"The kernelspec '{name}' cannot be read: {exc}") from None


def registered_provisioners():
    """Names of the provisioners jupyter_client can load (its entry-point group)."""
    return sorted({ep.name for ep in entry_points(group=PROVISIONER_GROUP)})


def complete_argv(argv, resource_dir):
    """argv as jupyter_client runs it: `{resource_dir}` filled in, `python` meaning this interpreter."""
    python_names = {"python", f"python{sys.version_info[0]}", "python%i.%i" % sys.version_info[:2]}
    argv = [arg.replace("{resource_dir}", resource_dir) for arg in argv]
    if argv and argv[0] in python_names:
        argv[0] = sys.executable
    return argv


def env_actions(env):
    """The kernelspec's env as Kallichore VarActions; `${VAR}` expands from our environment
    (string.Template, like jupyter_client's provisioners)."""
    return [{"action": "replace", "name": name, "value": string.Template(str(value)).safe_substitute(os.environ)}
            for name, value in env.items()]


def resolve_for(body):
    """The kernelspec a raw NewSession body names, or None; KernelSpecError for an unknown name
    or one whose provisioner is not registered (the start would fail anyway: say so now)."""
    name = body.get("kernel_name") if isinstance(body, dict) else None
    if name is None or name == "":
        return None
    if not isinstance(name, str):
        raise KernelSpecError("kernel_name must be a string")
    kspec = find(name)
    provisioner = kspec["provisioner"]
    if provisioner is not None and provisioner["name"] not in registered_provisioners():
        raise KernelSpecError(f"The kernelspec '{name}' names the kernel provisioner "
                              f"'{provisioner['name']}', which is not registered (registered: "
                              f"{', '.join(registered_provisioners())})")
    return kspec


def fill_new_session(body, kspec):
    """Complete a raw NewSession body from kernelspec `kspec`, before it is validated.

    Only missing fields are filled, so whatever the request says wins; the kernelspec's env
    actions go first, so the request's own actions override them.
    """
    if kspec is None or not isinstance(body, dict):
        return body
    filled = dict(body)
    if kspec["provisioner"] is None:
        filled.setdefault("argv", complete_argv(kspec["argv"], kspec["resource_dir"]))
    else:  # a provisioner completes argv itself, maybe for another machine: `python` means that one's
        filled.setdefault("argv", [arg.replace("{resource_dir}", kspec["resource_dir"]) for arg in kspec["argv"]])
    filled.setdefault("display_name", kspec["display_name"])
    filled.setdefault("language", kspec["language"])
    filled.setdefault("interrupt_mode", kspec["interrupt_mode"])
    if kspec["kernel_protocol_version"] and "protocol_version" not in filled:
        filled["protocol_version"] = str(kspec["kernel_protocol_version"])
    request_env = body.get("env")
    filled["env"] = env_actions(kspec["env"]) + (request_env if isinstance(request_env, list) else [])
    if request_env is not None and not isinstance(request_env, list):
        filled["env"] = request_env  # let validation name the problem
    for key, value in BODY_DEFAULTS.items():
        filled.setdefault(key, value)
    return filled


def attach(spec, kspec):
    """After validation: keep the resolved kernelspec, with the argv that actually runs (the
    request's, if it gave one), in the session spec."""
    if kspec is not None:
        spec["kernelspec"] = {**kspec, "argv": list(spec["argv"])}
    return spec
