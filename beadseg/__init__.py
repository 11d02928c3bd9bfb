__version__ = "0.1.0"

# `import beadseg` makes `keras.models.load_model` read beadseg's models with their losses and metrics, without importing
# Keras (and TensorFlow) itself: beadseg.losses, which registers them, is imported as soon as Keras is (nbs/00_losses.ipynb).
import sys as _sys

class _RegisterWithKeras:
    "A finder that has the module `keras`, once imported, import `beadseg.losses` right after it (by whatever path: TensorFlow imports Keras too)."
    searching = False
    def find_spec(self, name, path=None, target=None):
        if name != 'keras' or self.searching: return None
        from importlib.util import find_spec
        self.searching = True
        try: spec = find_spec(name)  # by the other finders
        finally: self.searching = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, 'exec_module'): return spec
        exec_module = spec.loader.exec_module
        def exec_then_register(module):
            exec_module(module)
            if self in _sys.meta_path: _sys.meta_path.remove(self)
            import beadseg.losses
        try: spec.loader.exec_module = exec_then_register
        except (AttributeError, TypeError): pass  # a loader that cannot be changed: `import beadseg.losses` registers them
        return spec

if 'keras' in _sys.modules: import beadseg.losses
elif not any(isinstance(f, _RegisterWithKeras) for f in _sys.meta_path): _sys.meta_path.insert(0, _RegisterWithKeras())
