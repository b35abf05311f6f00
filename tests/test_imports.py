"""The import structure: no cycle among the library's modules, kernels below the op layer, and the
kernels imported only when a Pallas call is made.

The graph is read from the source (``ast``): an edge for every import executed when a module is
imported (module and class bodies, not function bodies), plus the packages that import runs first
(``import a.b.c`` runs ``a/__init__`` and ``a/b/__init__``). Function-level imports are deferred
by design and are not edges; the rule below forbids the one that would invert the layering.
"""
import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("sparse_jax", "pallas_kernels")


def _modules() -> dict[str, pathlib.Path]:
  mods = {}
  for pkg in PACKAGES:
    for path in sorted((ROOT / pkg).rglob("*.py")):
      parts = list(path.relative_to(ROOT).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      mods[".".join(parts)] = path
  return mods


def _imports(tree: ast.AST, module: str, is_pkg: bool, top_level_only: bool):
  """Absolute names imported by ``tree`` (``from a import b`` gives a.b and a)."""

  def visit(node):
    for child in ast.iter_child_nodes(node):
      if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        continue
      if isinstance(child, ast.Import):
        for alias in child.names:
          yield alias.name
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          anchor = module.split(".")
          anchor = anchor if is_pkg else anchor[:-1]
          anchor = anchor[:len(anchor) - (child.level - 1)]
          base = ".".join(anchor + ([base] if base else []))
        yield base
        for alias in child.names:
          yield f"{base}.{alias.name}"
      yield from visit(child)

  yield from visit(tree)


def _graph(top_level_only: bool = True) -> dict[str, set[str]]:
  mods = _modules()
  graph = {}
  for name, path in mods.items():
    tree = ast.parse(path.read_text(), str(path))
    own_ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    edges = set()
    for target in _imports(tree, name, path.name == "__init__.py", top_level_only):
      parts = target.split(".")
      for i in range(1, len(parts) + 1):
        t = ".".join(parts[:i])
        if t in mods and t != name and t not in own_ancestors:
          edges.add(t)
    graph[name] = edges
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []
  counter = [0]

  def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
  for v in graph:
    if v not in index:
      strong(v)
  return out


def test_graph_sees_the_layering():
  """The checker itself: it finds known edges (so an empty cycle list means something)."""
  g = _graph()
  assert "sparse_jax.ops.base" in g["sparse_jax.ops.api"]
  assert "pallas_kernels.twell_gate" in g["sparse_jax.ops.pallas_backend"]
  assert {"sparse_jax.formats.twell", "sparse_jax"} <= g["pallas_kernels.twell_gate"]
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_no_import_cycle():
  assert _cycles(_graph()) == []


def test_kernels_never_import_the_op_layer():
  """pallas_kernels/ holds kernels only: no import of sparse_jax.ops, not even in a function."""
  bad = {name: sorted(t for t in edges if t.startswith("sparse_jax.ops"))
         for name, edges in _graph(top_level_only=False).items()
         if name.startswith("pallas_kernels")}
  assert {k: v for k, v in bad.items() if v} == {}


def test_op_layer_imports_kernels_only_for_a_pallas_call():
  code = (
      "import sys, jax, jax.numpy as jnp\n"
      "import sparse_jax, sparse_jax.nn, sparse_jax.train\n"
      "from sparse_jax import ops\n"
      "x = jax.random.normal(jax.random.key(0), (8, 64))\n"
      "w = jax.random.normal(jax.random.key(1), (256, 64))\n"
      "ops.gated_sparse_ffn(x, w, w, w, implementation='xla')\n"
      "before = sorted(m for m in sys.modules if m.startswith('pallas_kernels'))\n"
      "ops.gated_sparse_ffn(x, w, w, w)\n"
      "after = 'pallas_kernels.twell_gate' in sys.modules\n"
      "print(before, after)\n")
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "[] True"
