"""Does another release of torch or transformers still have every private API the harness uses?
Read from the release's wheel, without installing or importing it (so a CUDA wheel, or one for
another Python, can be checked on any machine):

    python scripts/check_private_apis.py torch-2.11.0-*.whl transformers-5.17.0-*.whl

Each patched symbol (harness/patches.py: PATCHES) must exist with the parameters the patch was
written for; each other private name the harness imports (found in harness/'s sources) or reaches
(ATTRIBUTES below) must be bound in its module. One line per check; exit 1 if any fails.
"""

from __future__ import annotations

import ast
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.patches import PATCHES  # noqa: E402

# Private names the harness reaches as attributes rather than imports ("module:name"); every
# `from <a private module> import …` in harness/ is found by `private_imports`.
ATTRIBUTES = (
    "torch.cuda.memory:_record_memory_history",
    "torch.cuda.memory:_snapshot",
    "torch.distributed.fsdp._fully_shard._fsdp_param:FSDPParam",
    "torch._ops:OpOverload",
)


HARNESS = Path(__file__).resolve().parent.parent / "harness"


def private_imports(root: Path = HARNESS) -> set[str]:
    """"module:name" of each name harness/ imports from a private (underscored) module of
    torch or transformers."""
    found = set()
    for source in root.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level and \
                    node.module.split(".")[0] in ("torch", "transformers") and \
                    any(part.startswith("_") for part in node.module.split(".")):
                found.update(f"{node.module}:{alias.name}" for alias in node.names)
    return found


def _source(wheels: dict[str, zipfile.ZipFile], module: str) -> str | None:
    found = _located(wheels, module)
    return found[0] if found else None


def _located(wheels: dict[str, zipfile.ZipFile], module: str) -> tuple[str, bool] | None:
    """(source, whether it is a package's __init__) of a module in the wheels."""
    top = module.split(".")[0]
    wheel = wheels.get(top)
    if wheel is None:
        return None
    base = module.replace(".", "/")
    for name, package in ((f"{base}.py", False), (f"{base}/__init__.py", True)):
        try:
            return wheel.read(name).decode(), package
        except KeyError:
            continue
    return None


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str, ...]:
    a = fn.args
    names = [x.arg for x in (*a.posonlyargs, *a.args)]
    if a.vararg:
        names.append("*" + a.vararg.arg)
    names += [x.arg for x in a.kwonlyargs]
    if a.kwarg:
        names.append("**" + a.kwarg.arg)
    return tuple(names)


def _signature(node) -> tuple[str, ...] | None:
    """Parameter names, as patches.parameters gives them, of a def, a class (its __init__,
    without self), or a builtin bound with its docstring (`name = _add_docstr(builtin, "name(a,
    b=1) -> T ...")`, as torch.nn.functional binds its C functions); None for anything else."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return _params(node)
    if isinstance(node, ast.ClassDef):
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef)
                     and n.name == "__init__"), None)
        return _params(init)[1:] if init else ()
    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
            getattr(node.value.func, "id", None) == "_add_docstr" and len(node.value.args) > 1:
        # the docstring, or its first literal where it is formatted or concatenated
        name = node.targets[0].id if isinstance(node.targets[0], ast.Name) else ""
        text = next((n.value for n in ast.walk(node.value.args[1])
                     if isinstance(n, ast.Constant) and isinstance(n.value, str)
                     and n.value.strip().startswith(f"{name}(")), None)
        if text is not None:
            head = text.strip().split("->")[0]
            inside = head[head.find("(") + 1:head.rfind(")")]
            return tuple(p.split("=")[0].strip() for p in inside.split(",")
                         if p.strip() and p.strip() != "*")
    return None


def _flat(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements of a body, those under an `if` (`if hasattr(torch._C, ...): ... else:
    def ...`) included, in order."""
    out = []
    for node in body:
        if isinstance(node, ast.If):
            out += _flat(node.body) + _flat(node.orelse)
        else:
            out.append(node)
    return out


def _dotted(node) -> str | None:
    """`a.b.c` of an attribute chain of names, or None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _find(tree: ast.Module, qualname: str):
    """The def or class of a dotted qualname, or the statement binding a module-level name."""
    scope: list[ast.stmt] = tree.body
    found = None
    for part in qualname.split("."):
        found = None
        for node in _flat(scope):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and \
                    node.name == part:
                found = node
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                    (alias.asname or alias.name.split(".")[0]) == part for alias in node.names):
                found = found or node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and any(
                    isinstance(t, ast.Name) and t.id == part
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])):
                found = node  # a later binding wins, as when the module runs
        if found is None:
            return None
        scope = getattr(found, "body", [])
    return found


def _absolute(module: str, node: ast.ImportFrom, package: bool = False) -> str:
    """The module a `from … import` in `module` (a package's __init__ if `package`) reads
    from."""
    if not node.level:
        return node.module or ""
    # a module's own package is one level up; a package's __init__ is its own package
    base = module.split(".")[:len(module.split(".")) - node.level + package]
    return ".".join(base + ([node.module] if node.module else []))


def check(wheel_paths: list[str]) -> list[tuple[bool, str]]:
    wheels = {}
    versions = {}
    for path in wheel_paths:
        zf = zipfile.ZipFile(path)
        dist, version = Path(path).name.split("-")[:2]
        tops = {n.split("/")[0] for n in zf.namelist() if "/" in n and ".dist-info" not in n}
        for top in tops:
            wheels[top] = zf
        versions[dist.replace("_", "-")] = version
    results = []
    for patch in PATCHES:
        for target, expected in patch.targets.items():
            module, _, qualname = target.partition(":")
            located = _located(wheels, module)
            if located is None:
                continue  # that library's wheel was not given
            src, package = located
            tree = ast.parse(src)
            node = _find(tree, qualname)
            if isinstance(node, ast.ImportFrom) and "." not in qualname:  # its own import
                origin = _absolute(module, node, package)
                origin_src = _source(wheels, origin)
                node = _find(ast.parse(origin_src), qualname) if origin_src else None
            for star in (n for n in tree.body if node is None and isinstance(n, ast.ImportFrom)
                         and any(a.name == "*" for a in n.names)):  # `from .random import *`
                origin_src = _source(wheels, _absolute(module, star, package))
                node = node or (_find(ast.parse(origin_src), qualname) if origin_src else None)
            # `name = staticmethod(torch.cuda.fn)`: fn's own signature, where it is defined
            bound = node.value.args[0] if isinstance(node, ast.Assign) and isinstance(
                node.value, ast.Call) and getattr(node.value.func, "id", None) == \
                "staticmethod" and node.value.args else None
            if _dotted(bound) and "." in _dotted(bound):
                owner, _, name = _dotted(bound).rpartition(".")
                owner_src = _source(wheels, owner)
                node = _find(ast.parse(owner_src), name) if owner_src else None
            found = _signature(node)
            if found is None:
                results.append((False, f"{target}: not found (patch {patch.name})"))
                continue
            results.append((found == tuple(expected),
                            f"{target}({', '.join(found)})" + (
                                "" if found == tuple(expected) else
                                f" — the patch {patch.name} was written for "
                                f"({', '.join(expected)})")))
    for item in sorted(private_imports()) + list(ATTRIBUTES):
        module, _, name = item.partition(":")
        src = _source(wheels, module)
        if src is None:
            if module.split(".")[0] in wheels:
                results.append((False, f"{module}: no such module"))
            continue
        ok = not name or _find(ast.parse(src), name) is not None or \
            _source(wheels, f"{module}.{name}") is not None  # a submodule
        results.append((ok, f"{module}:{name}" + ("" if ok else ": not found")))
    return [(ok, f"[{'ok' if ok else 'MISSING'}] {line}") for ok, line in results] + \
        [(True, "checked: " + ", ".join(f"{d} {v}" for d, v in versions.items()))]


if __name__ == "__main__":
    lines = check(sys.argv[1:])
    print("\n".join(line for _, line in lines))
    sys.exit(0 if all(ok for ok, _ in lines) else 1)
