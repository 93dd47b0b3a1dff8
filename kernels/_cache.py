"""Numba on-disk cache keyed on the whole kernels package, not one file.

Numba's ``cache=True`` checks only the source file that holds the ``@njit``
function, so a kernel whose helper (another file of this package) changed
would keep running stale machine code. The locators below give every kernel
defined in this package a source stamp that hashes all of the package's
``.py`` files, so editing any of them recompiles every cached kernel.
Each kernel file also carries a ``KERNEL_VERSION`` string for humans.
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


class PackageInTreeLocator(_PackageStampMixin, caching.InTreeCacheLocator):
    pass


class PackageUserWideLocator(_PackageStampMixin, caching.UserWideCacheLocator):
    pass


class PackageUserProvidedLocator(_PackageStampMixin,
                                 caching.UserProvidedCacheLocator):
    pass


def install():
    """Put the package locators first (idempotent)."""
    classes = caching.CacheImpl._locator_classes
    for cls in (PackageUserWideLocator, PackageInTreeLocator,
                PackageUserProvidedLocator):
        if cls not in classes:
            classes.insert(0, cls)


def _writable_location():
    """Whether some locator can keep compiled kernels for this package (Numba's own test:
    the folder exists or can be made, and a file can be created in it)."""
    def probe():
        pass
    for cls in caching.CacheImpl._locator_classes:
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
        f"fxopt: no writable folder for compiled kernels (next to {_PKG_DIR}, the user cache "
        "folder, or NUMBA_CACHE_DIR): this process compiles the kernels it uses without "
        "keeping them (tens of seconds). Set NUMBA_CACHE_DIR to a writable folder to keep them.",
        RuntimeWarning, stacklevel=2)
