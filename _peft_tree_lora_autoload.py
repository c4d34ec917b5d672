"""Registers TreeLoRA with PEFT as soon as PEFT is imported, so that a program that never imports this plugin
(lm-evaluation-harness, a script, `AutoPeftModelForCausalLM` in a notebook) can still load a TreeLoRA adapter.

`peft_tree_lora_autoload.pth`, installed into site-packages with the package, runs `install_at_startup()` when Python
starts. That puts one small finder at the front of `sys.meta_path`. It answers only for the name `peft`, and only by
asking the finders after it for PEFT's real spec, whose loader it wraps: once PEFT's own module has executed, the
wrapper puts the real loader back, takes the finder out of `sys.meta_path` and imports `peft_tree_lora.tuner`, which
registers the `TREELORA` method. So:

- start-up imports this module alone (it needs only `sys`, already loaded); neither torch nor PEFT is imported
  until the program imports PEFT itself;
- `importlib.util.find_spec("peft")` (transformers' availability probe) gets PEFT's real spec and imports nothing;
- nothing recurses: the finder skips itself while it searches and is gone before the plugin is imported;
- `PEFT_TREE_LORA_NO_AUTOLOAD=1` (any value but empty or `0`) switches the start-up hook off; an explicit
  `import peft_tree_lora` still registers.

A failure to import the plugin after PEFT (a broken install) is a warning from the start-up hook, never an error in
`import peft`; the same failure after an explicit `import peft_tree_lora` is raised.

This is a top-level module, not part of `peft_tree_lora`, so that start-up does not import that package.
"""

from __future__ import annotations

import sys
from _thread import get_ident  # builtin, unlike threading: nothing to load at start-up

DISABLE_VARIABLE = "PEFT_TREE_LORA_NO_AUTOLOAD"
WATCHED = "peft"  # the module whose import triggers the registration
PLUGIN = "peft_tree_lora.tuner"  # importing it registers TreeLoRA with PEFT


def autoload_disabled(environ=None) -> bool:
    """True when the environment switches the start-up hook off (`PEFT_TREE_LORA_NO_AUTOLOAD` set, not `0`)."""
    if environ is None:
        import os

        environ = os.environ
    return environ.get(DISABLE_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def install_at_startup() -> None:
    """What the `.pth` file runs: import the plugin right after PEFT, unless the environment says not to."""
    if not autoload_disabled():
        import_plugin_after_peft(raise_errors=False)


def import_plugin_after_peft(raise_errors: bool = True) -> None:
    """Import `peft_tree_lora.tuner` (registration) now if PEFT is already imported, else right after PEFT is."""
    if WATCHED in sys.modules:
        _import_plugin(raise_errors)
        return
    finder = next((f for f in sys.meta_path if isinstance(f, PeftImportFinder)), None)
    if finder is None:
        finder = PeftImportFinder()
        sys.meta_path.insert(0, finder)
    finder.raise_errors = finder.raise_errors or raise_errors


def _import_plugin(raise_errors: bool) -> None:
    import importlib

    try:
        # While the plugin's own import is what imports PEFT, this returns the half-imported tuner package; its
        # import registers TreeLoRA when it completes.
        importlib.import_module(PLUGIN)
    except Exception as error:
        if raise_errors:
            raise
        import warnings

        warnings.warn(
            f"peft-tree-lora could not register TreeLoRA with PEFT after `import peft` ({type(error).__name__}: "
            f"{error}); TreeLoRA adapters will not load. Set {DISABLE_VARIABLE}=1 to skip this attempt.",
            RuntimeWarning,
            stacklevel=2,
        )


class PeftImportFinder:
    """A meta-path finder for PEFT only: finds PEFT's spec with the other finders and wraps its loader so that the
    plugin is imported once PEFT's module has executed. It never creates or executes a module itself."""

    def __init__(self) -> None:
        self.raise_errors = False
        self._searching: set[int] = set()  # threads inside find_spec: skip ourselves there, not in other threads

    def find_spec(self, fullname, path=None, target=None):
        thread = get_ident()
        if fullname != WATCHED or thread in self._searching:
            return None
        self._searching.add(thread)
        try:
            spec = None
            for finder in list(sys.meta_path):
                find_spec = getattr(finder, "find_spec", None)
                if finder is self or find_spec is None:
                    continue
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._searching.discard(thread)
        if spec is not None and callable(getattr(spec.loader, "exec_module", None)):
            spec.loader = _ThenImportPlugin(spec.loader, self)
        return spec

    def imported(self, module) -> None:
        """PEFT's module has executed: leave the import system as it would be without us, then import the plugin."""
        loader = module.__loader__
        if isinstance(loader, _ThenImportPlugin):
            module.__loader__ = loader.loader
            if getattr(module, "__spec__", None) is not None and module.__spec__.loader is loader:
                module.__spec__.loader = loader.loader
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        _import_plugin(self.raise_errors)


class _ThenImportPlugin:
    """PEFT's own loader, which tells the finder when PEFT's module has executed. Everything else is the loader's."""

    def __init__(self, loader, finder: PeftImportFinder) -> None:
        self.loader = loader
        self.finder = finder

    def create_module(self, spec):
        create_module = getattr(self.loader, "create_module", None)
        return create_module(spec) if create_module is not None else None

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        self.finder.imported(module)

    def __getattr__(self, name):
        return getattr(self.loader, name)
