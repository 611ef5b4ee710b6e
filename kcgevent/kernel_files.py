"""Where kernels' connection files live: one private (0700) directory, made on first use.

Without a state dir it is a temporary directory that goes with the server; with one it is the state
dir's `kernels/` directory, so that a restarted server finds the same files.
"""
import hashlib
import json
import os
import re
import shutil
import tempfile


class KernelFiles:
    """Connection/registration files (0600) and each session's launcher directory."""

    def __init__(self, directory=None):
        self._dir = directory  # None: a temporary directory, made when first needed
        self._temporary = directory is None

    @property
    def directory(self):
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="kcgevent-")
        elif not os.path.isdir(self._dir):
            os.makedirs(self._dir, mode=0o700, exist_ok=True)
        return self._dir

    @staticmethod
    def file_stem(session_id):
        """A file-name-safe, unique name for `session_id`."""
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", session_id)[:40]
        digest = hashlib.sha256(session_id.encode()).hexdigest()[:10]
        return f"{safe}-{digest}"

    def path(self, session_id, kind):
        return os.path.join(self.directory, f"{kind}_{self.file_stem(session_id)}.json")

    def write(self, session_id, kind, content):
        """Write a connection/registration file (0600, in our private dir); return its path."""
        path = self.path(session_id, kind)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(content, f, indent=2)
        return path

    def remove(self, session_id):
        """Remove a session's connection files (its launcher directory stays until `remove_all`)."""
        if self._dir is None:
            return
        for kind in ("connection", "registration"):
            try:
                os.unlink(self.path(session_id, kind))
            except FileNotFoundError:
                pass

    def launcher_dir(self, session_id):
        """A private directory the session's launcher may use (guardian status, output files)."""
        return os.path.join(self.directory, f"launcher_{self.file_stem(session_id)}")

    def remove_launcher_dir(self, session_id):
        if self._dir is not None:
            shutil.rmtree(self.launcher_dir(session_id), ignore_errors=True)

    def remove_all(self):
        """The server is done: a temporary directory goes entirely."""
        if self._dir is not None and self._temporary:
            shutil.rmtree(self._dir, ignore_errors=True)
