"""Signal-mode interrupts on Windows, the way Jupyter kernels expect them.

There is no SIGINT for another process on Windows. Kernels (ipykernel's
ParentPollerWindows) instead wait on an inheritable event whose handle they
find in JPY_INTERRUPT_EVENT, and watch the handle in JPY_PARENT_PID to exit
with their parent. UNTESTED here: CI runs on Linux; the module imports
everywhere and touches the Windows API only when called.
"""
import ctypes

_events = {}  # session id -> event handle


class _SecurityAttributes(ctypes.Structure):
    _fields_ = [("nLength", ctypes.c_uint32), ("lpSecurityDescriptor", ctypes.c_void_p),
                ("bInheritHandle", ctypes.c_int)]


def _inheritable():
    sa = _SecurityAttributes()
    sa.nLength = ctypes.sizeof(sa)
    sa.bInheritHandle = 1
    return sa


def kernel_env(session_id):
    """JPY_INTERRUPT_EVENT / IPY_INTERRUPT_EVENT / JPY_PARENT_PID for a kernel we spawn."""
    kernel32 = ctypes.windll.kernel32
    event = _events.get(session_id)
    if event is None:
        sa = _inheritable()
        event = kernel32.CreateEventW(ctypes.byref(sa), False, False, None)  # auto-reset
        _events[session_id] = event
    current = kernel32.GetCurrentProcess()
    parent = ctypes.c_void_p()
    DUPLICATE_SAME_ACCESS = 2
    kernel32.DuplicateHandle(current, current, current, ctypes.byref(parent), 0, True, DUPLICATE_SAME_ACCESS)
    return {"JPY_INTERRUPT_EVENT": str(event), "IPY_INTERRUPT_EVENT": str(event),
            "JPY_PARENT_PID": str(parent.value)}


def interrupt(session_id):
    """Set the session's interrupt event; False if it has none."""
    event = _events.get(session_id)
    if event is None:
        return False
    return bool(ctypes.windll.kernel32.SetEvent(event))
