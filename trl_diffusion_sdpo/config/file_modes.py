"""The permissions of what the package writes: a file the mode the user's umask gives ``open()`` (``0o666 & ~umask``),
a folder the mode it gives ``os.makedirs`` (``0o777 & ~umask``), whichever library wrote them. safetensors (0.8)
writes owner-only (``save_file``, so diffusers' ``save_pretrained`` and ``save_lora_weights`` too): each writer of the
package calls :func:`follow_umask` on what it wrote. In the bottom layer, so that the data layer's caches share it."""

from __future__ import annotations

import logging
import os
import stat
import tempfile

__all__ = ["current_umask", "follow_umask"]

logger = logging.getLogger(__name__)

_PROC_STATUS = "/proc/self/status"
_FOLDER_BITS_KEPT = stat.S_ISGID | stat.S_ISVTX  # a shared group folder keeps its setgid (and sticky) bit


def current_umask() -> int:
    """The process's umask, read without changing it: ``/proc/self/status`` (Linux 4.7+), else a new folder's mode.
    Never ``os.umask(0)`` and back, which leaves a moment where another thread creates world-writable files."""
    try:
        with open(_PROC_STATUS, encoding="ascii") as f:
            found = [line.split()[1] for line in f if line.startswith("Umask:")]
        if found:
            return int(found[0], 8)
    except (OSError, ValueError, IndexError):
        pass
    with tempfile.TemporaryDirectory(prefix="umask-") as private:  # a folder: 0o777 shows every bit of the umask
        probe = os.path.join(private, "probe")
        os.mkdir(probe, 0o777)
        return 0o777 & ~stat.S_IMODE(os.stat(probe).st_mode)


def follow_umask(*paths: str | os.PathLike[str]) -> None:
    """Give each of ``paths`` and everything under a folder among them the umask's mode for a new file or folder.
    Only for what the package just wrote; links are left alone. A filesystem refusing ``chmod`` only warns."""
    umask = current_umask()
    modes = {False: 0o666 & ~umask, True: 0o777 & ~umask}
    for top in map(os.fspath, paths):
        found = [top] if os.path.exists(top) else []
        if os.path.isdir(top):
            found += [os.path.join(root, name) for root, folders, files in os.walk(top) for name in folders + files]
        for path in found:
            if os.path.islink(path):
                continue
            folder = os.path.isdir(path)
            try:
                current = stat.S_IMODE(os.stat(path).st_mode)
                wanted = modes[folder] | (current & _FOLDER_BITS_KEPT if folder else 0)
                if current != wanted:
                    os.chmod(path, wanted)
            except OSError as error:
                logger.warning("Could not set the permissions of %s to %o: %s", path, modes[folder], error)
