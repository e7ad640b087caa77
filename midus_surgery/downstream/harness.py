"""`midus-surgery eval --tasks`: downstream tasks through lm-evaluation-harness, several models side by side.

lm-eval is used as a library: its ``HFLM`` wraps each model as this package loads it (strictly:
a missing or unexpected tensor is an error, never a random one), and ``simple_evaluate`` scores
the tasks, with every seed set from ``seed``. Any task lm-eval knows works where its dataset can
be read (the Hub, or a local datasets cache); ``include_path`` adds task folders, such as the
offline suite ``tools/make_task_suite.py`` writes (task_suite.py).

lm-eval is an extra (``pip install -e ".[eval]"``): without it, one line says so.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import math
import os
import sys
import time
from pathlib import Path
from unittest import mock

from midus_surgery.downstream.task_guard import (
    TaskError,
    check_task_folders,
    checked_data_reads,
    moved_suite,
    sandboxed_templates,
    task_files,
)
from midus_surgery.errors import one_line, printable
from midus_surgery.io.small_files import regular_file_problem


def _lm_eval():
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        import importlib.util

        try:
            installed = importlib.util.find_spec("lm_eval") is not None
        except (ValueError, AttributeError):  # a module entry of None (imports blocked): not installed, as far as we can use it
            installed = False
        if installed:  # installed, and failing to import: say why, not "install it" (trial76 F5)
            raise TaskError(f"lm-evaluation-harness is installed but does not import ({one_line(exc, 300)}): a version that does not "
                            "fit this transformers or its own dependencies; pip install -U \"lm-eval>=0.4.12,<0.5\"") from None
        raise TaskError("eval --tasks needs lm-evaluation-harness, an extra: pip install -e \".[eval]\" (or pip install lm-eval)") from None
    return simple_evaluate, _counting(HFLM), TaskManager


def _counting(HFLM):
    """lm-eval's HFLM, counting the log-likelihoods it computes and those that are not numbers. A model whose activations
    overflow (fp16) gives NaN for every choice; lm-eval's argmax then picks the first, and a cloze task scored it acc
    1.0000 ± 0.0000 beside perplexity nan, exit 0 (trial136 F2). Every loglikelihood task, rolling ones included, goes
    through ``_loglikelihood_tokens``: its ``(logprob, is_greedy)`` pairs are counted there."""

    class CountingHFLM(HFLM):
        scored = 0
        not_numbers = 0

        def _loglikelihood_tokens(self, requests, *args, **kwargs):
            out = super()._loglikelihood_tokens(requests, *args, **kwargs)
            self.scored += len(out)
            self.not_numbers += sum(not math.isfinite(logprob) for logprob, _ in out)
            return out

    return CountingHFLM


def run_tasks(models: list[Path], tasks: list[str], *, include_path: list[Path] = (), allow_task_code: bool = False,
              limit: float | None = None, num_fewshot: int | None = None, batch_size: int = 4, device: str = "auto",
              seed: int = 0, dtype: str = "float32", trust_remote_code: bool = False, progress: bool = True, allow_pickle: bool = False) -> dict:
    """Score every model on every task; ``{"tasks", "settings", "models": [{"model", "results", "seconds"}]}``.
    ``results``: task -> metric -> value, with ``<metric>_stderr`` beside each. Every model is checked before the
    first is scored (``check_model_loads``, no weights read), then loaded once; one of several that still fails
    raises ``ModelFailed`` naming it, whose ``partial`` is this result for the models scored before it (None: none);
    a ``KeyboardInterrupt`` (Ctrl-C, SIGTERM) leaves with the same ``partial``."""
    import torch

    from midus_surgery.errors import MidusError
    from midus_surgery.train.evaluate import (
        DTYPES,
        ModelFailed,
        check_model_loads,
        eval_device,
        load_causal_lm,
        out_of_memory,
        raised_at,
        unforeseen,
        unforeseen_failure,
    )

    if limit is not None and not limit > 0:
        raise TaskError(f"--limit must be above 0 (items per task, or a fraction below 1), got {limit:g}")
    if limit is not None and limit >= 1:
        if limit != int(limit):
            raise TaskError(f"--limit {limit:g}: at or above 1 it counts items per task, a whole number (below 1 it is a fraction)")
        limit = int(limit)
    simple_evaluate, HFLM, TaskManager = _lm_eval()
    from jinja2.exceptions import SecurityError
    include_path = [Path(p) for p in include_path]
    check_task_folders(include_path, allow_task_code)
    tasks = list(dict.fromkeys(tasks))  # a task named twice is scored once (it printed each row twice)
    defined = task_files(include_path)
    twice = next((t for t in tasks if len(defined.get(t, [])) > 1), None)
    if twice:  # every offline suite names its tasks alike: lm-eval would score the one it read last, without a word (trial54)
        files = defined[twice]
        raise TaskError(f"--tasks: {twice!r} is defined in {len(files)} task files ({', '.join(map(str, files[:3]))}): lm-eval "
                        "would score one of them without a word; pass the folder you mean alone in --include-path")
    for t in tasks:
        if t in defined:
            _check_data_files(t, defined[t][0], include_path)
    if dtype not in DTYPES:
        raise TaskError(f"--dtype must be one of {', '.join(DTYPES)}")
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("datasets").setLevel(logging.CRITICAL)  # a data file it cannot read: our one line says so, not its log
    with _task_overrides() as overridden:
        manager = TaskManager(include_path=[str(p) for p in include_path] or None)
    for task, (local, builtin) in overridden.items():
        if task in tasks:  # lm-eval's own warning is muted with its log: a local arc_easy was scored silently (trial73 F4)
            print(f"note: task {task!r} is read from {local} (--include-path), in place of lm-eval's own ({builtin})", file=sys.stderr)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    unread = [t for t in unknown if t in defined]
    if unread:  # a task file lm-eval skipped without a word (an include cycle, a template it fails on) was "no task" (trial73 F9b)
        raise TaskError(f"--tasks: {unread[0]!r} is defined in {defined[unread[0]][0]}, but lm-eval could not read that file (it "
                        "skips a task file it fails on without a word: an include that leads back to itself, a key it does not know)")
    if unknown:
        near = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        said = "; ".join(f"{t!r}" + (f" (did you mean {', '.join(near[t])}?)" if near[t] else "") for t in unknown)
        raise TaskError(f"--tasks: lm-eval knows no task {said}; local task folders go in --include-path")
    run_on = eval_device(device)
    # every model checked as far as it goes without reading its weights, before the first long evaluation; its tokenizer kept
    tokenizers = [check_model_loads(Path(m), trust_remote_code=trust_remote_code, allow_pickle=allow_pickle) for m in models]
    from huggingface_hub import constants

    hub_down = None if constants.HF_HUB_OFFLINE else _hub_unreachable()  # probed once for all the models
    rows = []

    def result() -> dict:
        # what lm-eval scored: a tag (ai2_arc) or a group is its tasks, which it reports by their own names (trial146 F3)
        scored = list(dict.fromkeys(t for r in rows for t in r["results"])) or list(tasks)
        return {"tasks": scored, "models": list(rows),
                "settings": {"limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size, "device": str(run_on), "dtype": dtype,
                             "seed": seed,
                             # which folder's task was scored (every offline suite names its tasks alike)
                             "task_files": {t: str(defined[t][0]) for t in scored if t in defined}}}

    def score(m, tokenizer) -> dict:
        start = time.perf_counter()
        model = load_causal_lm(Path(m), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, progress=progress,
                               allow_pickle=allow_pickle, headers_checked=True).to(run_on).eval()  # check_model_loads, above
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            with _lm_eval_output(progress), _no_git(), _no_fork_pool(), _offline_for(hub_down) as offline, \
                    (contextlib.nullcontext() if allow_task_code else sandboxed_templates()), \
                    (contextlib.nullcontext() if allow_task_code else checked_data_reads(include_path)):
                out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                      log_samples=False, bootstrap_iters=1000, verbosity="ERROR", random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        except SecurityError as exc:
            raise TaskError(f"a task template reaches for Python's internals or does more work than a template needs, refused by "
                            f"the sandbox ({one_line(exc, 200)}); "
                            "pass --allow-task-code if you trust it") from None
        except TaskError:  # what the task reads, refused (checked_data_reads): the task's fault, not the model's
            raise
        except StopIteration:  # lm-eval takes the first document of each task to build it
            raise TaskError(f"lm-eval could not score {', '.join(tasks)} on {m}: a task has no documents "
                            "(an empty data file, or a split with no rows)") from None
        except Exception as exc:  # noqa: BLE001 - a dataset that cannot be read (no network), a task that does not build
            if num_fewshot is not None and isinstance(exc, ValueError) and "larger than population" in str(exc):
                # random.sample of a task's few-shot pool: the flag's fault, not the model's
                raise TaskError(f"--num-fewshot {num_fewshot}: more few-shot examples than a task of {', '.join(tasks)} has to "
                                "draw them from; give fewer") from None
            reading = offline and _reading_failed(exc)  # not said of an error in the model's forward (helper-61)
            why = f"; {offline}, so only datasets in the local datasets cache can be read" if reading else ""
            # where it was raised: an empty AssertionError in lm-eval's task code read as the model's failure (trial73 F9c)
            at = raised_at(exc)
            where = f" (raised at {at[1]})" if at else ""
            # the task's data, not the model (trial83 F7), fetched from the Hub too (trial92 N2: blamed on the model)
            if at and at[1].startswith(("datasets/", "fsspec/", "huggingface_hub/")):
                raise TaskError(f"lm-eval could not read the data of {', '.join(tasks)}: "
                                f"{one_line(exc, 800, whole=True)}{where}{why}") from None
            raise TaskError(f"lm-eval could not score {', '.join(tasks)} with the model {m}: {one_line(exc, 800, whole=True)}{where}{why}") from None
        reported = out["results"]
        names = [t for t in tasks if t in reported] + [t for t in reported if t not in tasks]  # the given first, then a tag's tasks
        return {"model": str(m), "results": {t: _metrics(reported[t]) for t in names},
                # how many of the log-likelihoods its scores stand on are NaN or inf: any is a model that computed nothing
                "loglikelihoods": lm.scored, "loglikelihoods_not_numbers": lm.not_numbers,
                "seconds": round(time.perf_counter() - start, 1)}  # the model and its wrapper freed on return

    for m, tokenizer in zip(models, tokenizers):  # each model's weights read once, to be scored
        try:
            rows.append(score(m, tokenizer))
        except (MemoryError, torch.OutOfMemoryError) as exc:  # the table of the models before it is kept
            raise ModelFailed(m, out_of_memory(m, exc, run_on, "a smaller --batch-size"), result() if rows else None) from None
        except MidusError as exc:  # what the checks could not see (a tensor's bytes, a converting load), a task that fails on it
            if len(models) == 1:
                raise
            raise ModelFailed(m, exc, result() if rows else None) from None
        except Exception as exc:  # noqa: BLE001 - outside lm-eval's scoring (moving the model to the device, lm-eval's wrapper)
            if unforeseen(exc):  # one line (under the table of the models before it), not a traceback
                raise ModelFailed(m, unforeseen_failure(m, exc), result() if rows else None) from None
            exc.partial = result() if rows else None  # a full disk, a file it cannot read: the CLI's own line, under the table
            raise
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (cli.Terminated): the caller prints the models scored, then "interrupted"
            exc.partial = result() if rows else None
            raise
    return result()


def _reading_failed(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it came from) is a failure to read or fetch something: an OSError (a missing
    file, a connection: requests' errors are OSErrors too) or an error of the libraries that fetch datasets."""
    seen = 0
    while exc is not None and seen < 16:
        if isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in ("datasets", "huggingface_hub", "fsspec"):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _inside_any(path: Path, folders) -> bool:
    real = (path if path.is_absolute() else Path.cwd() / path).resolve()
    return any(real.is_relative_to(Path(f).resolve()) for f in folders)


def _check_data_files(task: str, yaml_file: Path, include_path=()) -> None:
    """A local task's data files are there: a suite names its data by absolute path, and a moved suite
    failed as "lm-eval could not score it on MODEL", blaming the model (trial54)."""
    import yaml

    try:
        config = yaml.safe_load(yaml_file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # tags (allowed task code): lm-eval reads it, and says what fails
        return
    if not isinstance(config, dict):
        return
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    named = [name for entry in (files.values() if isinstance(files, dict) else [files])
             for name in (entry if isinstance(entry, list) else [entry]) if isinstance(name, str)]
    rebuild = "rebuild the suite where it is (python tools/make_task_suite.py TEXT --out DIR)"
    for name in named:
        odd = Path(name).exists() and regular_file_problem(Path(name))
        if odd:  # a pipe or a device was said as "not there: was the suite folder moved?" (trial73 F9)
            raise TaskError(f"task {task!r} ({yaml_file}) reads its data from {name}: {odd}")
        if Path(name).is_absolute() and not any(c in name for c in "*?[") and not Path(name).is_file():  # a pattern: checked as read
            raise TaskError(f"task {task!r} ({yaml_file}) reads its data from {name}, which is not there: was the suite folder "
                            f"moved? {rebuild[0].upper()}{rebuild[1:]}")
    digest = (config.get("metadata") or {}).get("data_sha256")
    if isinstance(digest, str) and len(named) == 1 and not _inside_any(Path(named[0]), include_path) and \
            (moved := moved_suite(yaml_file, config, named[0])):
        raise TaskError(moved)  # with --allow-task-code too: a copy scored its original's items without a word
    if isinstance(digest, str) and len(named) == 1 and Path(named[0]).is_file():  # a suite's: its data as written
        if hashlib.sha256(Path(named[0]).read_bytes()).hexdigest() != digest:
            raise TaskError(f"task {task!r} ({yaml_file}) reads its data from {named[0]}, which has changed since the task was "
                            f"written (a copy of a suite whose original was rebuilt scores the new items); {rebuild}")


@contextlib.contextmanager
def _task_overrides():
    """Collect, while lm-eval indexes its tasks, the task names a later folder's YAML takes over: name -> (new, old file)."""
    found: dict[str, tuple[str, str]] = {}

    class Overrides(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if str(record.msg).startswith("Task '%s' from %s overrides") and len(record.args or ()) == 3:
                name, new, old = record.args
                found[str(name)] = (str(new), str(old))

    index_log = logging.getLogger("lm_eval.tasks._index")
    handler, level, propagate = Overrides(logging.WARNING), index_log.level, index_log.propagate
    index_log.addHandler(handler)
    index_log.setLevel(logging.WARNING)
    index_log.propagate = False  # collected here, not printed as lm-eval's log line
    try:
        yield found
    finally:
        index_log.removeHandler(handler)
        index_log.setLevel(level)
        index_log.propagate = propagate


@contextlib.contextmanager
def _no_git():
    """lm-eval records ``git describe`` of the working directory: a subprocess that prints "fatal:
    not a git repository" outside one, and runs git (and whatever the directory's git config names)
    inside one. Nothing here reads it."""
    import lm_eval.evaluator

    if not hasattr(lm_eval.evaluator, "get_git_commit_hash"):
        yield
        return
    with mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None):
        yield


HUB_PROBE_SECONDS = 3


def _hub_unreachable() -> str | None:
    """Why the Hub cannot be reached from here (one short connection attempt), or None when it can,
    or may (a proxy is set: the attempt would not go through it)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_PROBE_SECONDS).close()
    except OSError as exc:
        return f"{url.hostname} is unreachable from here ({exc.strerror or exc})"
    return None



@contextlib.contextmanager
def _offline_for(why: str | None):
    """Offline mode (datasets from the local cache only) for a block when the Hub cannot be reached
    (``why``, from _hub_unreachable): datasets and huggingface_hub otherwise retry each file five times
    with back-off, 47 s of "Retrying in 8s" lines before the same error. Yields ``why``."""
    import datasets.config
    from huggingface_hub import constants

    if why is None:
        yield None
        return
    with mock.patch.object(constants, "HF_HUB_OFFLINE", True), mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True), \
            mock.patch.object(datasets.config, "HF_DATASETS_OFFLINE", True):
        yield why


@contextlib.contextmanager
def _no_fork_pool():
    """lm-eval bootstraps the stderr of perplexity-like metrics in a multiprocessing.Pool, forked (Linux's
    default) from this process, whose torch threads can hold a lock at the moment of the fork: a worker
    then waits forever, and the run with it (seen: eval --tasks hung until killed). DISABLE_MULTIPROC,
    lm-eval's own switch, bootstraps in this process instead (1000 draws: a fraction of a second)."""
    with mock.patch.dict(os.environ, {"DISABLE_MULTIPROC": "1"}):
        yield


@contextlib.contextmanager
def _lm_eval_output(progress: bool):
    """lm-eval prints progress to stdout, which is ours (the table, the JSON): it goes to stderr,
    and with ``progress`` off (--quiet, --json) nowhere, with the datasets' bars. Piped into a log file
    it goes nowhere too: its bars are tqdm's, redrawn frames that would glue themselves onto the log."""
    import datasets

    from midus_surgery.io.progress import on_terminal

    if progress and on_terminal():
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    datasets.disable_progress_bars()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        try:
            yield
        finally:
            datasets.enable_progress_bars()


def _metrics(task_result: dict) -> dict:
    """lm-eval's ``acc,none`` / ``acc_stderr,none`` keys as ``acc`` / ``acc_stderr``, and a filter's (gsm8k's
    ``exact_match,strict-match``) as ``exact_match (strict-match)`` / ``exact_match (strict-match)_stderr``: cut at the
    comma, every filter of a metric wrote to one entry, the last one read (trial146 F1); ``items``: how many it scored."""
    out = {}
    for key, value in task_result.items():
        metric, _, kept = key.partition(",")
        if metric == "sample_len":
            out["items"] = int(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and metric != "alias":
            stderr = metric.endswith("_stderr")
            name = metric.removesuffix("_stderr") + ("" if kept in ("", "none") else f" ({kept})")
            out[name + ("_stderr" if stderr else "")] = float(value)
    return out


def model_labels(paths: list[str]) -> list[str]:
    """Column names: each directory's name, with its parent's where that alone says little (a
    training run's ``final``), and with as many more of its path as it takes for two different models
    never to share one (runs/a/final and x/runs/a/final were both "a/final": trial65)."""
    parts = [Path(p).absolute().parts for p in paths]
    depth = [2 if len(pp) > 1 and pp[-1] in ("final", "export") else 1 for pp in parts]
    while True:
        labels = [Path(*pp[-d:]).as_posix() for pp, d in zip(parts, depth)]
        deeper = [i for i, label in enumerate(labels)
                  if any(labels[j] == label and parts[j] != parts[i] for j in range(len(labels))) and depth[i] < len(parts[i])]
        if not deeper:
            return labels
        for i in deeper:
            depth[i] += 1


def format_table(result: dict) -> str:
    """One row per task metric, one column per model: ``0.412 ± 0.022``."""
    names = [printable(name) for name in model_labels([r["model"] for r in result["models"]])]
    header = ["task (items)", "metric", *names]
    lines = []
    for task in result["tasks"]:
        metrics = sorted({k for r in result["models"] for k in r["results"].get(task, {}) if not k.endswith("_stderr") and k != "items"})
        for metric in metrics:
            cells = []
            for r in result["models"]:
                got = r["results"].get(task, {})
                value, err = got.get(metric), got.get(f"{metric}_stderr")
                cells.append("-" if value is None else f"{value:.4f}" + (f" ± {err:.4f}" if isinstance(err, float) and err == err else ""))
            items = max((r["results"].get(task, {}).get("items", 0) for r in result["models"]), default=0)
            lines.append([f"{printable(task)} ({items})", metric, *cells])
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])
