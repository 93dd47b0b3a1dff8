"""Numba on-disk cache of the kernels: in the user's cache folder, keyed on the whole package.

Where: ``$FXOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fxopt``, else ``~/.cache/fxopt``; one
subfolder ``kernels-<stamp>`` per kernel source (never the install folder, which may be
read-only or shared). ``NUMBA_CACHE_DIR`` is the fallback when that folder is not writable.

Stale code: Numba's ``cache=True`` checks only the source file that holds the ``@njit``
function, so a kernel whose helper (another file of this package) changed would keep
running stale machine code. The locators below give every kernel of this package a source
stamp that hashes all of the package's ``.py`` files, so editing any of them (a new
version) recompiles every kernel, in a new subfolder. Numba keys each compiled entry on
the CPU name and features too, so a cache shared by two CPUs never hands one the other's
code. Each kernel file also carries a ``KERNEL_VERSION`` string for humans.
"""
import hashlib
import os
import warnings

from numba.core import caching

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def _hash_sources():
    h = hashlib.sha256()
    for name in sorted(os.listdir(_PKG_DIR)):
        if name.endswith(".py"):
            with open(os.path.join(_PKG_DIR, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


# taken once, as the package is imported (this module comes first): the source this
# process runs. Re-read at each cache lookup, a process still running the old code after
# an edit would store its machine code under the new source's stamp, for every later
# process to load as current.
_STAMP = _hash_sources()


def package_stamp():
    """Hash of the source of every module in this package, as this process imported it."""
    return _STAMP


def cache_dir():
    """The folder compiled kernels of this source are kept in (made on first use)."""
    root = os.environ.get("FXOPT_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "fxopt")
    return os.path.join(os.path.abspath(root), f"kernels-{_STAMP[:16]}")


def _in_package(py_file):
    return os.path.dirname(os.path.abspath(py_file)) == _PKG_DIR


class _PackageStampMixin:
    @classmethod
    def from_function(cls, py_func, py_file):
        if not _in_package(py_file):
            return None
        return super().from_function(py_func, py_file)

    def get_source_stamp(self):
        return package_stamp()


class FxoptCacheLocator(_PackageStampMixin, caching._SourceFileBackedLocatorMixin,
                        caching._CacheLocator):
    """Every kernel of the package in cache_dir(), one flat folder (file names carry the
    module, function and line)."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = cache_dir()

    def get_cache_path(self):
        return self._cache_path


class PackageUserProvidedLocator(_PackageStampMixin,
                                 caching.UserProvidedCacheLocator):
    pass


def install():
    """Put the package locators first (idempotent)."""
    classes = caching.CacheImpl._locator_classes
    for cls in (PackageUserProvidedLocator, FxoptCacheLocator):
        if cls not in classes:
            classes.insert(0, cls)


def _writable_location():
    """Whether one of the package's locators can keep compiled kernels (Numba's own test:
    the folder exists or can be made, and a file can be created in it). Numba's default
    locators (next to the source, its user folder) are not asked: their stamp is one file's."""
    def probe():
        pass
    for cls in (FxoptCacheLocator, PackageUserProvidedLocator):
        try:
            locator = cls.from_function(probe, os.path.join(_PKG_DIR, "_cache.py"))
            if locator is not None:
                locator.ensure_cache_path()
                return True
        except OSError:
            continue
    return False


install()

# Every kernel is decorated @njit(cache=CACHE). Without a writable location Numba would
# refuse to define a cached function at all ("no locator available"): compile anew in
# each process instead, and say so once.
CACHE = _writable_location()
if not CACHE:
    warnings.warn(
        f"fxopt: no writable folder for compiled kernels ({cache_dir()}, or NUMBA_CACHE_DIR): "
        "this process compiles the kernels it uses without keeping them (a minute or more). "
        "Set FXOPT_CACHE_DIR to a writable folder to keep them.",
        RuntimeWarning, stacklevel=2)
