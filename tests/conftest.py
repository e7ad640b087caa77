"""Session-wide test setup."""

import os

import pytest

# Triton kernels (midus_surgery/kernels/hml_triton.py) run on CPU tensors through Triton's
# interpreter in this suite. triton.jit reads the switch when a kernel is defined, and torch's
# compiler imports triton's own jit functions as soon as any test compiles, so it is set here,
# before any test module is imported. Only Triton kernels read it.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (README: `-n auto`) every worker is a process of its own: one torch thread each
# (and in their subprocesses) keeps the workers from oversubscribing the cores, where OpenMP's
# parallel regions wait on threads another worker holds off its core.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture()
def one_thread():
    """Tiny models run fastest on one thread, and results then match the subprocesses' exactly
    (training tests opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch  # here, not at the top: TRITON_INTERPRET must be set before torch can reach triton

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_LM_EVAL_PARSED: dict = {}  # lm-eval's own task YAMLs, parsed: (path, arguments) -> config, for the test process's life


@pytest.fixture(scope="module")
def lm_eval_builtin_tasks_parsed_once():
    """lm-eval's TaskManager parses all of its own ~14,000 task YAMLs on every build (~10 s here), and every in-process
    `eval --tasks` builds one: in the modules that ask, each of those files is parsed once per test process, and a deep
    copy handed out on each later build (lm-eval's installed files do not change while the suite runs). Task folders of
    the tests' own are parsed afresh every time, as the product does; other modules see lm-eval unpatched."""
    import copy
    from pathlib import Path

    try:
        import lm_eval
        import lm_eval.tasks._index as index
    except ImportError:  # no lm-eval, or another layout of it: nothing to speed up
        yield
        return
    own = str(Path(lm_eval.__file__).resolve().parent) + os.sep
    parse = index.load_yaml

    def load_yaml(path, *args, **kwargs):
        if not str(path).startswith(own):
            return parse(path, *args, **kwargs)
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in _LM_EVAL_PARSED:
            _LM_EVAL_PARSED[key] = parse(path, *args, **kwargs)
        return copy.deepcopy(_LM_EVAL_PARSED[key])

    index.load_yaml = load_yaml
    yield
    index.load_yaml = parse


def pytest_collection_modifyitems(config, items):
    """The modules with tests marked slow (a minute or more each, several processes some of them) run first, their slow
    tests first: pytest-xdist hands tests out in this order, and one started last kept a worker busy for minutes after
    the other had finished. A module's tests stay together, so its module-scoped fixtures are built once."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    first_seen: dict[str, int] = {}
    for index, item in enumerate(items):
        first_seen.setdefault(item.module.__name__, index)
    items.sort(key=lambda item: (item.module.__name__ not in slow_modules, first_seen[item.module.__name__],
                                 item.get_closest_marker("slow") is None))
