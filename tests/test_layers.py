"The modules form layers: no import cycle among beadseg's modules, imports inside functions included (see README, Development)."
import ast
from pathlib import Path
from graphlib import CycleError, TopologicalSorter

PACKAGE = Path(__file__).resolve().parents[1]/'beadseg'


def imports_of(path:Path) -> set[str]:
    "The beadseg modules `path` imports anywhere in its text: `from .x`, `from beadseg.x`, `from . import x`, `import beadseg.x`."
    modules, names = set(), {p.stem for p in PACKAGE.glob('*.py')}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level == 1 or base.startswith('beadseg'):
                base = base.removeprefix('beadseg').lstrip('.')
                modules |= {base.split('.')[0]} if base else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            modules |= {a.name.split('.')[1] for a in node.names if a.name.startswith('beadseg.')}
    return (modules & names) - {path.stem}


def module_graph() -> dict[str, set[str]]:
    return {p.stem: imports_of(p) for p in PACKAGE.glob('*.py') if not p.stem.startswith('_')}


def test_imports_are_read_from_every_form():
    "The reader sees relative, absolute and function-level imports (the cycle check below relies on it)."
    graph = module_graph()
    assert {'runs', 'tables'} <= graph['search'] and 'predict' in graph['export'] and 'inference' in graph['train']
    assert 'predict' not in graph['train'] and 'search' not in graph['halving']


def test_no_import_cycle():
    "No module imports one that imports it back, directly or through others."
    try: order = list(TopologicalSorter(module_graph()).static_order())
    except CycleError as err: raise AssertionError(f'import cycle: {" -> ".join(err.args[1])}') from None
    assert order.index('config') < order.index('cli')
