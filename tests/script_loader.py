"""Import a command-line script of the repository as a module, to call its ``main`` in process."""
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(path):
    """The module of ``path`` (absolute, or relative to the repository root), freshly executed."""
    path = path if os.path.isabs(path) else os.path.join(REPO, path)
    name = os.path.splitext(os.path.basename(path))[0] + "_under_test"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
