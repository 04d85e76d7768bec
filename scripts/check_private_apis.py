"""Does another release of torch or transformers still have every private API the harness uses?
Read from the release's wheel, without installing or importing it (so a CUDA wheel, or one for
another Python, can be checked on any machine):

    python scripts/check_private_apis.py torch-2.11.0-*.whl transformers-5.17.0-*.whl

Each patched symbol (harness/patches.py: PATCHES) must exist with the parameters the patch was
written for; each other private name the harness imports (PRIVATE below) must be bound in its
module. One line per check; exit 1 if any fails.
"""

from __future__ import annotations

import ast
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.patches import PATCHES  # noqa: E402

# "module:name" of every private (underscored) module or name the harness imports, outside
# the patches: grep -rn "torch\\._\\|\\._[a-z]" harness finds them.
PRIVATE = (
    "torch._subclasses.fake_tensor:FakeTensorMode",
    "torch._subclasses.fake_tensor:is_fake",
    "torch._subclasses.fake_tensor:unset_fake_temporarily",
    "torch.utils._pytree:tree_leaves",
    "torch.utils._python_dispatch:TorchDispatchMode",
    "torch.utils._triton:has_triton",
    "torch._inductor:list_mode_options",
    "torch._inductor.config:",
    "torch.testing._internal.distributed.fake_pg:FakeStore",
    "torch.cuda.memory:_record_memory_history",
    "torch.cuda.memory:_snapshot",
    "torch.distributed.fsdp._fully_shard._fsdp_param:FSDPParam",
)


def _source(wheels: dict[str, zipfile.ZipFile], module: str) -> str | None:
    top = module.split(".")[0]
    wheel = wheels.get(top)
    if wheel is None:
        return None
    base = module.replace(".", "/")
    for name in (f"{base}.py", f"{base}/__init__.py"):
        try:
            return wheel.read(name).decode()
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


def _find(tree: ast.Module, qualname: str):
    """The def or class of a dotted qualname, or the statement binding a module-level name."""
    scope: list[ast.stmt] = tree.body
    found = None
    for part in qualname.split("."):
        found = None
        for node in scope:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and \
                    node.name == part:
                found = node
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                    (alias.asname or alias.name.split(".")[0]) == part for alias in node.names):
                found = found or node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and any(
                    isinstance(t, ast.Name) and t.id == part
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])):
                found = found or node
        if found is None:
            return None
        scope = getattr(found, "body", [])
    return found


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The module a `from … import` in `module` reads from."""
    if not node.level:
        return node.module or ""
    base = module.split(".")[:-node.level]  # a module's own package is one level up
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
            src = _source(wheels, module)
            if src is None:
                continue  # that library's wheel was not given
            node = _find(ast.parse(src), qualname)
            if isinstance(node, ast.ImportFrom) and "." not in qualname:  # its own import
                origin = _absolute(module, node)
                origin_src = _source(wheels, origin)
                node = _find(ast.parse(origin_src), qualname) if origin_src else None
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                results.append((False, f"{target}: not found (patch {patch.name})"))
                continue
            found = _params(node)
            results.append((found == tuple(expected),
                            f"{target}({', '.join(found)})" + (
                                "" if found == tuple(expected) else
                                f" — the patch {patch.name} was written for "
                                f"({', '.join(expected)})")))
    for item in PRIVATE:
        module, _, name = item.partition(":")
        src = _source(wheels, module)
        if src is None:
            if module.split(".")[0] in wheels:
                results.append((False, f"{module}: no such module"))
            continue
        ok = not name or _find(ast.parse(src), name) is not None
        results.append((ok, f"{module}:{name}" + ("" if ok else ": not found")))
    return [(ok, f"[{'ok' if ok else 'MISSING'}] {line}") for ok, line in results] + \
        [(True, "checked: " + ", ".join(f"{d} {v}" for d, v in versions.items()))]


if __name__ == "__main__":
    lines = check(sys.argv[1:])
    print("\n".join(line for _, line in lines))
    sys.exit(0 if all(ok for ok, _ in lines) else 1)
