"""Build hooks: the start-up hook `peft_tree_lora_autoload.pth` goes into site-packages, for `pip install .` (wheels)
and for `pip install -e .` (PEP 660 editable wheels) alike. Everything else is declared in setup.cfg.

A `.pth` file must sit at the top of site-packages, which no setup.cfg option reaches (package data lands inside a
package, data files under the prefix): `build_py` copies it to the top of the build folder, which a wheel installs
into site-packages; an editable wheel is not made from that folder, so the editable strategy chosen by setuptools
also writes it into the editable wheel.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "peft_tree_lora_autoload.pth"
PTH_SOURCE = Path(__file__).resolve().parent / PTH


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_file(str(PTH_SOURCE), str(Path(self.build_lib) / PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


class EditableWheelWithPth(editable_wheel):
    def _select_strategy(self, name, tag, build_lib):
        return _AlsoWritePth(super()._select_strategy(name, tag, build_lib))


class _AlsoWritePth:
    """The editable strategy setuptools picked (a finder or a static .pth), plus our .pth at the wheel's top."""

    def __init__(self, strategy):
        self.strategy = strategy

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self.strategy.__exit__(*exc_info)

    def __call__(self, wheel, files, mapping):
        self.strategy(wheel, files, mapping)
        wheel.writestr(PTH, PTH_SOURCE.read_bytes())


commands = {"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth}
if not hasattr(editable_wheel, "_select_strategy"):  # a setuptools whose editable internals changed
    print(f"warning: this setuptools has no editable_wheel._select_strategy; an editable install lacks {PTH}")
    del commands["editable_wheel"]

setup(cmdclass=commands)
