"""nvdiffrast backends: its CUDA rasterizer ('cuda') or its OpenGL/EGL context ('opengl').

This is the only module of the project that imports nvdiffrast, and only on first use.
Users install the PyPI build ``pip install diffrp-nvdiffrast==0.3.3.1`` (module
``nvdiffrast.torch``), which JIT-compiles its plugin with ``torch.utils.cpp_extension`` the
first time a context is created (once; needs the CUDA toolkit and ninja).

Known problem handled here: with recent PyTorch, ``torch.utils.cpp_extension`` loads a built
extension by file path without putting its build folder on ``sys.path``, while nvdiffrast then
imports the plugin by name, which fails with ``ModuleNotFoundError: No module named
'nvdiffrast_plugin_...'``. We then add the plugin's build folder(s) to ``sys.path`` and retry,
once per plugin (the CUDA one, and the OpenGL one '..._gl'). Checked against torch 2.13 with a
stand-in extension loaded the way nvdiffrast 0.3.3.1's ``_get_plugin`` does.

Start-up fast path (:func:`preload_plugins`): when the plugin is already built for this
nvdiffrast, torch and Python, its module is imported straight from torch's build folder and put
in nvdiffrast's own plugin cache (``nvdiffrast.torch.ops._cached_plugin``), so ``_get_plugin``
returns it at once: no ``torch.utils.cpp_extension`` call, no ninja, no failed import and retry.
Anything unexpected (another nvdiffrast version, no build yet, a plugin that does not import)
leaves the cache alone and nvdiffrast's normal path runs. :func:`warm_up` does this (and the
import of nvdiffrast) ahead of the first render, e.g. in a thread while the model loads.
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
import sys
import threading

import torch

from .base import Rasterizer

logger = logging.getLogger(__name__)

PIP_PACKAGE = "diffrp-nvdiffrast==0.3.3.1"
CONTEXTS = ("cuda", "opengl")
_PLUGIN_PREFIX = "nvdiffrast_plugin"


class NvdiffrastUnavailableError(RuntimeError):
    """nvdiffrast is missing, cannot be built or loaded, or its context cannot be created."""


def nvdiffrast_available() -> bool:
    """Whether the nvdiffrast package can be found.

    Returns:
        True if ``importlib`` finds it (it is not imported: a broken install still says True).
    """
    return importlib.util.find_spec("nvdiffrast") is not None


def _import_nvdiffrast():
    try:
        import nvdiffrast.torch as dr
    except ImportError as exc:
        raise NvdiffrastUnavailableError(
            f"the 'cuda' and 'opengl' renderers need nvdiffrast: `pip install {PIP_PACKAGE}` (builds its CUDA "
            f"plugin on first use; needs the CUDA toolkit and ninja), or render on the CPU with `--device cpu` "
            f"({type(exc).__name__}: {exc})") from exc
    return dr


def plugin_build_dirs(module_name: str) -> list[str]:
    """Folders where ``torch.utils.cpp_extension`` may have built the extension ``module_name``.

    That is ``<root>/<module_name>`` and ``<root>/<pyXY_cuZZZ>/<module_name>`` for root =
    ``$TORCH_EXTENSIONS_DIR`` and torch's default build root (``~/.cache/torch_extensions``);
    torch's own answer (``_get_build_directory``) comes first. Only existing folders are returned.

    Args:
        module_name: the extension's module name (:func:`plugin_module_name`).

    Returns:
        Existing folders, without duplicates, torch's own answer first.
    """
    from torch.utils import cpp_extension

    candidates = []
    get_build_directory = getattr(cpp_extension, "_get_build_directory", None)  # private; may change
    if get_build_directory is not None:
        try:
            candidates.append(get_build_directory(module_name, False))
        except Exception:  # noqa: BLE001 - only a hint; the globs below cover the same places
            pass
    roots = [os.environ.get("TORCH_EXTENSIONS_DIR"), cpp_extension.get_default_build_root()]
    for root in filter(None, roots):
        candidates.append(os.path.join(root, module_name))
        candidates += sorted(glob.glob(os.path.join(glob.escape(root), "*", module_name)))
    found = []
    for path in candidates:
        if os.path.isdir(path) and path not in found:
            found.append(path)
    return found


def plugins_to_build(context: str = "cuda") -> list[str]:
    """The plugins that ``context`` needs and that nvdiffrast has not built yet for this torch
    (it builds them at the first render: about 25 s with nvcc, once per machine and torch
    version). Empty where that cannot be told (nvdiffrast missing, or a version whose plugin
    naming is not known here).

    Args:
        context: 'cuda' or 'opengl' (also the '_gl' plugin).

    Returns:
        The plugins' module names, e.g. ``['nvdiffrast_plugin_0_3_3_1_torch2_11_0_cu130']``.
    """
    try:
        import nvdiffrast
    except ImportError:
        return []
    version = getattr(nvdiffrast, "__version__", None)
    if version not in _FAST_PATH_VERSIONS:
        return []
    try:
        return [n for _, n in context_plugins(version, context) if n not in sys.modules and _plugin_file(n) is None]
    except Exception:  # noqa: BLE001 - only a notice depends on it
        return []


_BUILT_HERE: set[str] = set()  # plugins this process announced it builds (their failed import is expected)


def _with_plugin_path_retry(call, what: str):
    """Run ``call()``; when it fails to import a built nvdiffrast plugin, put the plugin's build
    folder on sys.path and run it again (once per plugin: the CUDA one and the OpenGL one)."""
    handled: list[str] = []
    while True:
        try:
            return call()
        except ModuleNotFoundError as exc:
            name = exc.name or ""
            if not name.startswith(_PLUGIN_PREFIX):
                raise
            dirs = plugin_build_dirs(name)
            if name in handled:
                raise NvdiffrastUnavailableError(
                    f"nvdiffrast built its plugin {name!r} but Python cannot import it, even with its build "
                    f"folder(s) {dirs or '(none found)'} on sys.path ({what}); delete that folder to force a "
                    f"rebuild, check TORCH_EXTENSIONS_DIR, or render on the CPU with `--device cpu`") from exc
            handled.append(name)
            added = [d for d in dirs if d not in sys.path]
            sys.path.extend(added)
            logger.log(logging.INFO if name in _BUILT_HERE else logging.WARNING,
                       "nvdiffrast plugin %r was built but is not importable; added %s to sys.path and retrying",
                       name, added or "nothing")


# --------------------------------------------------------------------------- start-up fast path
_PRELOAD_LOCK = threading.Lock()
_FAST_PATH_VERSIONS = ("0.3.3.1",)  # nvdiffrast versions whose plugin naming and cache are known here


def context_plugins(nvdiffrast_version: str, context: str) -> list[tuple[bool, str]]:
    """The plugins ``context`` needs, as (gl, :func:`plugin_module_name`) pairs for this torch:
    'cuda' the CUDA one; 'opengl' also the '_gl' one."""
    return [(gl, plugin_module_name(nvdiffrast_version, torch.__version__, gl))
            for gl in ((False, True) if context == "opengl" else (False,))]


def plugin_module_name(nvdiffrast_version: str, torch_version: str, gl: bool) -> str:
    """The name nvdiffrast 0.3.3.1 gives its plugin: ``nvdiffrast_plugin_<ver>_torch<ver>[_gl]``,
    non-word characters replaced by '_' (its ``sanitize_name``).

    Args:
        nvdiffrast_version: e.g. ``'0.3.3.1'``.
        torch_version: ``torch.__version__``.
        gl: the OpenGL plugin (suffix ``_gl``) rather than the CUDA one.

    Returns:
        The module name, e.g. ``'nvdiffrast_plugin_0_3_3_1_torch2_5_1_cu124'``.
    """
    import re

    name = f"nvdiffrast_plugin_{nvdiffrast_version}_torch{torch_version}" + ("_gl" if gl else "")
    return re.sub(r"\W|^(?=\d)", "_", name)


def _plugin_file(name: str) -> str | None:
    """The built plugin in torch's build folder for ``name`` (where nvdiffrast's JIT build puts
    it and where it looks first), or None. Like nvdiffrast, this lets torch create the (empty)
    build folder if it does not exist."""
    from torch.utils import cpp_extension

    get_build_directory = getattr(cpp_extension, "_get_build_directory", None)
    if get_build_directory is None:
        return None
    path = os.path.join(get_build_directory(name, False), name + getattr(cpp_extension, "LIB_EXT", ".so"))
    return path if os.path.isfile(path) else None


def preload_plugins(context: str = "cuda") -> bool:
    """Put the already-built plugin(s) that ``context`` needs ('cuda': the CUDA one; 'opengl':
    also the '_gl' one) into nvdiffrast's plugin cache. Thread-safe; never raises (only for
    nvdiffrast versions in ``_FAST_PATH_VERSIONS``; others are left to nvdiffrast).

    Args:
        context: 'cuda' or 'opengl'.

    Returns:
        True when nvdiffrast will not need to build, check or import anything; False leaves
        everything to nvdiffrast's own path (not installed, another version, a plugin not built
        yet or not loadable).
    """
    try:
        import nvdiffrast
        import nvdiffrast.torch.ops as ops
    except ImportError:
        return False
    cache = getattr(ops, "_cached_plugin", None)
    if getattr(nvdiffrast, "__version__", None) not in _FAST_PATH_VERSIONS or not isinstance(cache, dict):
        return False
    ok = True
    with _PRELOAD_LOCK:
        for gl, name in context_plugins(nvdiffrast.__version__, context):
            if cache.get(gl) is not None:
                continue
            try:
                module = sys.modules.get(name)
                if module is None:
                    path = _plugin_file(name)
                    if path is None:  # not built yet: nvdiffrast builds it (once)
                        ok = False
                        continue
                    spec = importlib.util.spec_from_file_location(name, path)
                    module = importlib.util.module_from_spec(spec)
                    spec.loader.exec_module(module)
                    sys.modules[name] = module
                cache[gl] = module
                logger.debug("nvdiffrast plugin %s loaded directly", name)
            except Exception as exc:  # noqa: BLE001 - any surprise: nvdiffrast's normal path decides
                logger.debug("nvdiffrast plugin %s: fast path not taken (%s: %s)", name, type(exc).__name__, exc)
                ok = False
    return ok


def warm_up(context: str = "cuda") -> bool:
    """Import nvdiffrast and preload its plugin(s) (see :func:`preload_plugins`); never raises.

    Args:
        context: 'cuda' or 'opengl'.

    Returns:
        :func:`preload_plugins`' answer; False also when nvdiffrast cannot be imported.
    """
    try:
        _import_nvdiffrast()
        return preload_plugins(context)
    except Exception:  # noqa: BLE001 - the first render reports problems properly
        return False


def announce_build(context: str = "cuda") -> list[str]:
    """Tell the user (a warning: shown by default) that the first render builds nvdiffrast's
    plugin(s) for ``context``, so that a pause of about 25 s is not taken for a hang.

    Returns:
        :func:`plugins_to_build`'s names (empty: nothing announced).
    """
    names = plugins_to_build(context)
    if names:
        from torch.utils import cpp_extension

        _BUILT_HERE.update(names)
        logger.warning("nvdiffrast: building its %s plugin for torch %s (once per machine and torch version, about "
                       "25 s; kept in %s; `python -m tools.build_nvdiffrast` builds it ahead)", context,
                       torch.__version__, os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    return names


def build_plugins(context: str = "cuda", device: str = "cuda") -> list[str]:
    """Build (if needed) and load nvdiffrast's plugin(s) for ``context`` by rendering one
    triangle on ``device``: what the first render of a run would otherwise do.

    Returns:
        The plugins that were built now (empty: already built).

    Raises:
        NvdiffrastUnavailableError, ValueError: as :meth:`NvdiffrastRasterizer.rasterize_interpolate`.
    """
    todo = plugins_to_build(context)
    clip = torch.tensor([[[-0.5, -0.5, 0.0, 1.0], [0.5, -0.5, 0.0, 1.0], [0.0, 0.5, 0.0, 1.0]]], device=device)
    tri = torch.tensor([[0, 1, 2]], device=device)
    NvdiffrastRasterizer(context).rasterize_interpolate(clip, tri, torch.ones(1, 3, 1, device=device), (8, 8))
    return todo


class NvdiffrastRasterizer(Rasterizer):
    """Rasterize with nvdiffrast, exactly as the original renderer does (instance mode, no AA).

    Args:
        context: 'cuda' (``RasterizeCudaContext``, needs no display or EGL) or 'opengl'
            (``RasterizeGLContext``, needs EGL). Contexts are created on first use, one per device.

    Raises:
        ValueError: ``context`` is not one of :data:`CONTEXTS`.
    """

    def __init__(self, context: str = "cuda"):
        if context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
        self.name = context
        self._contexts: dict[torch.device, object] = {}
        self._preloaded = False

    def _context(self, dr, device: torch.device):
        ctx = self._contexts.get(device)
        if ctx is not None:
            return ctx
        if self.name == "cuda":
            create, what = (lambda: dr.RasterizeCudaContext(device=device)), "CUDA rasterizer"
            advice = "render on the CPU with `--device cpu`"
        else:
            create, what = (lambda: dr.RasterizeGLContext(device=device)), "OpenGL rasterizer"
            advice = ("it needs EGL and an NVIDIA driver with OpenGL; use nvdiffrast's CUDA rasterizer with "
                      "`--use_opengl False` (or the CPU with `--device cpu`)")
        try:
            ctx = create()
        except ModuleNotFoundError:
            raise  # a built but unimportable plugin: handled by the caller's retry
        except Exception as exc:  # noqa: BLE001 - build, EGL and driver failures surface as assorted types
            raise NvdiffrastUnavailableError(
                f"could not create nvdiffrast's {what} context on {device} ({type(exc).__name__}: {exc}); "
                f"{advice}") from exc
        logger.info("created nvdiffrast %s context on %s", self.name, device)
        self._contexts[device] = ctx
        return ctx

    def _render(self, dr, clip, tri, attr, size):
        ctx = self._context(dr, clip.device)
        tri32 = tri.to(torch.int32).contiguous()
        rast, _ = dr.rasterize(ctx, clip.float().contiguous(), tri32, resolution=list(size))
        attr_image, _ = dr.interpolate(attr.float().contiguous(), rast, tri32)
        return rast[..., 3] > 0, attr_image.to(attr.dtype)

    def rasterize_interpolate(self, clip, tri, attr, size):
        """See :meth:`Rasterizer.rasterize_interpolate` (shapes and outputs); computed in float32,
        the attribute image cast back to ``attr``'s dtype.

        Raises:
            ValueError: ``clip`` is not on a CUDA device.
            NvdiffrastUnavailableError: nvdiffrast cannot be imported, its plugin not imported or
                its context not created.
        """
        if clip.device.type != "cuda":
            raise ValueError(f"the {self.name!r} renderer needs CUDA tensors, got vertices on {clip.device}; "
                             f"move the inputs to the GPU or use the 'cpu' renderer (`--device cpu`)")
        dr = _import_nvdiffrast()
        if not self._preloaded:
            self._preloaded = True
            if not preload_plugins(self.name):
                announce_build(self.name)
        # The plugins load lazily: the context loads its own (the OpenGL one '..._gl'), and
        # interpolate() the CUDA one, so the whole call is retried, and at most once.
        return _with_plugin_path_retry(lambda: self._render(dr, clip, tri, attr, size), f"{self.name} renderer")
