"""`midus-surgery eval --tasks` (issue 27): lm-evaluation-harness on several models side by side, and
the offline task suite built from plain text.

The base and untrained function-preserving outputs of it (LLaMA-Pro, MIDUS) must score exactly
alike: their logits are the base's. Errors (no lm-eval, an unknown task, a task folder that would
run code, a suite written over its own text) are one line and exit 2."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_fixtures.tiny import make_model_dir, make_tokenizer

from midus_surgery.cli import main
from midus_surgery.downstream.task_suite import build_task_suite, sentences

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread", "lm_eval_builtin_tasks_parsed_once")

SUBJECTS = ["The cat", "The dog", "The bird", "The fish", "A cat", "A dog"]
VERBS = ["sat on the mat", "ran to the log", "flew over the tree", "swam in the pond", "sat in the tree", "ran on the mat"]


def write_documents(directory: Path, n: int = 8) -> Path:
    """Documents of short prose sentences, each a little different, from the tiny tokenizer's words."""
    directory.mkdir(parents=True, exist_ok=True)
    for d in range(n):
        lines = [f"{SUBJECTS[(d + i) % 6]} {VERBS[(2 * d + i) % 6]} and then the {['cat', 'dog', 'bird', 'fish'][i % 4]} {VERBS[(d + 3 * i) % 6]}."
                 for i in range(6)]
        (directory / f"doc{d}.txt").write_text(" ".join(lines) + "\n")
    return directory


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from midus_surgery.compiler.planner import plan_recipe
    from midus_surgery.emit.emitter import emit

    root = tmp_path_factory.mktemp("downstream")
    base = make_model_dir(root / "base", with_plan=False)
    make_tokenizer().save_pretrained(base)
    models = {"base": base}
    for kind in ("identity", "memory"):  # LLaMA-Pro and MIDUS, untrained: the base's function
        memory = "memory:\n  n_subkeys: 8\n  topk: 4\n  latent_dim: 8\n" if kind == "memory" else ""
        recipe = root / f"{kind}.yaml"
        recipe.write_text(f"base:\n  path: {base}\nlayout:\n  interleave:\n    after_every: 2\n    kind: {kind}\n{memory}"
                          f"output:\n  dir: {kind}-out\n  dtype: float32\n")
        models[kind] = emit(plan_recipe(recipe), progress=False).out_dir
    text = write_documents(root / "text")
    counts = build_task_suite([str(text)], root / "tasks", items=12, seed=0)
    return {"root": root, "text": text, "tasks": root / "tasks", "counts": counts, **models}


def test_the_suite_holds_true_items(world):
    assert world["counts"] == {"midus_next_sentence": 12, "midus_cloze": 12}
    texts = [" ".join(p.read_text().split()) for p in sorted(world["text"].glob("*.txt"))]
    docs = [sentences(text) for text in texts]
    contexts = []
    for line in (world["tasks"] / "midus_next_sentence.jsonl").read_text().splitlines():
        item = json.loads(line)
        assert len(item["choices"]) == 4 == len(set(item["choices"]))
        # the keyed answer is the very next sentence of the text, and no other choice ever follows the context
        assert any(f"{item['context']} {item['choices'][item['label']]}" in text for text in texts), item
        assert sum(any(f"{item['context']} {c}" in text for text in texts) for c in item["choices"]) == 1
        contexts.append(item["context"])
    assert len(contexts) == len(set(contexts))
    every = {s for sents in docs for s in sents}
    for line in (world["tasks"] / "midus_cloze.jsonl").read_text().splitlines():
        item = json.loads(line)
        assert f"{item['context']} {item['target']}." in every
    yaml_text = (world["tasks"] / "midus_cloze.yaml").read_text()
    assert str(world["tasks"] / "midus_cloze.jsonl") in yaml_text and "!function" not in yaml_text


def test_the_base_and_its_function_preserving_outputs_score_alike(world, capsys):
    """One call, three models, one JSON: every metric equal; and the table names each model."""
    args = [str(world[k]) for k in ("base", "identity", "memory")]
    common = ["--tasks", "midus_next_sentence,midus_cloze", "--include-path", str(world["tasks"]), "--limit", "8",
              "--batch-size", "3", "--quiet"]
    assert main(["eval", *args, *common, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [Path(r["model"]) for r in result["models"]] == [Path(a) for a in args]
    base = result["models"][0]["results"]
    assert base["midus_next_sentence"]["items"] == 8 and {"acc", "acc_norm", "acc_stderr"} <= set(base["midus_next_sentence"])
    assert {"acc", "perplexity"} <= set(base["midus_cloze"])
    for other in result["models"][1:]:
        assert other["results"] == base
    # which folder's tasks were scored (every offline suite names its tasks alike: trial54)
    assert result["settings"]["task_files"] == {t: str(world["tasks"] / f"{t}.yaml") for t in ("midus_next_sentence", "midus_cloze")}
    assert main(["eval", *args[:2], *common[:-1]]) == 0  # not --quiet, into a log (capsys: not a terminal)
    captured = capsys.readouterr()
    assert "\r" not in captured.err  # lm-eval's tqdm bars would redraw their frames into the log
    table = captured.out.splitlines()
    assert table[0].split()[:4] == ["task", "(items)", "metric", "base"] and "identity-out" in table[0]
    assert any(row.startswith("midus_cloze (8)") and "perplexity" in row for row in table)


def test_a_task_two_folders_define_is_refused_and_one_named_twice_is_scored_once(world, tmp_path, capsys):
    """trial54: with two suites in --include-path (their tasks are named alike), lm-eval scored the one it read
    last without a word; a task named twice in --tasks printed its rows twice; a suite moved after it was built
    failed as a model that could not be scored; a copied suite scored its original's data after a rebuild (trial56)."""
    import shutil

    second = tmp_path / "second-suite"
    shutil.copytree(world["tasks"], second)
    common = ["--limit", "2", "--batch-size", "2", "--quiet"]
    assert main(["eval", str(world["base"]), "--tasks", "midus_cloze", "--include-path", str(world["tasks"]), "--include-path", str(second),
                 *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tasks: 'midus_cloze' is defined in 2 task files (") and "pass the folder you mean alone" in err
    assert main(["eval", str(world["base"]), "--tasks", "midus_cloze", "midus_cloze", "--include-path", str(world["tasks"]), *common]) == 0
    assert sum(row.startswith("midus_cloze (2)") for row in capsys.readouterr().out.splitlines()) == 2  # acc and perplexity, once each

    # one folder reached twice (another path to it) is one suite, not two definitions
    again = tmp_path / "the-same-suite"
    again.symlink_to(world["tasks"], target_is_directory=True)
    assert main(["eval", str(world["base"]), "--tasks", "midus_cloze", "--include-path", str(world["tasks"]), "--include-path", str(again),
                 *common]) == 0
    capsys.readouterr()
    # a copy of a suite whose original was rebuilt from other items: its YAMLs name the original's data
    original, copy = tmp_path / "original-suite", tmp_path / "copied-suite"
    build_task_suite([str(world["text"])], original, items=4)
    shutil.copytree(original, copy)
    build_task_suite([str(world["text"])], original, items=3)
    assert main(["eval", str(world["base"]), "--tasks", "midus_cloze", "--include-path", str(copy), *common]) == 2
    # data outside the task's folder (trial92 F3); a suite's copy is said so, with the one way out: its remedies for a task
    # of one's own (the data's folder as another --include-path: "defined in 2 task files"; --allow-task-code: the
    # original's items scored without a word) misled
    moved = (f"error: {copy / 'midus_cloze.yaml'}: this task suite was copied or moved from {original}: it still reads that folder's "
             f"data ({original / 'midus_cloze.jsonl'}); rebuild the suite where it is (python tools/make_task_suite.py TEXT --out {copy})")
    err = capsys.readouterr().err
    assert err.strip() == moved, err
    assert main(["eval", str(world["base"]), "--tasks", "midus_cloze", "--include-path", str(copy), "--allow-task-code", *common]) == 2
    err = capsys.readouterr().err
    assert err.strip() == moved, err
    shutil.rmtree(copy)
    shutil.copytree(original, copy)  # a copy of the suite as it is now: --allow-task-code scored the original's items, exit 0
    assert main(["eval", str(world["base"]), "--tasks", "midus_cloze", "--include-path", str(copy), "--allow-task-code", *common]) == 2
    assert capsys.readouterr().err.strip() == moved

    # a task file lm-eval skips without a word (an include cycle) was "lm-eval knows no task" (trial73 F9b)
    cycle = tmp_path / "cycle"
    cycle.mkdir()
    (cycle / "t.yaml").write_text("task: t_cycle\ninclude: t.yaml\n")
    assert main(["eval", str(world["base"]), "--tasks", "t_cycle", "--include-path", str(cycle), *common]) == 2
    err = capsys.readouterr().err
    assert f"'t_cycle' is defined in {(cycle / 't.yaml').resolve()}, but lm-eval could not read that file" in err, err
    # a local task named like one of lm-eval's own replaces it: said, not only in --json's task_files (trial73 F4)
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "arc_easy.yaml").write_text((world["tasks"] / "midus_cloze.yaml").read_text().replace("task: midus_cloze", "task: arc_easy"))
    assert main(["eval", str(world["base"]), "--tasks", "arc_easy", "--include-path", str(shadow), "--include-path", str(world["tasks"]),
                 *common]) == 0  # the suite's folder too: the copy reads its data
    err = capsys.readouterr().err
    assert f"note: task 'arc_easy' is read from {shadow / 'arc_easy.yaml'} (--include-path), in place of lm-eval's own (" in err, err

    built, moved = tmp_path / "built-suite", tmp_path / "moved-suite"
    build_task_suite([str(world["text"])], built, items=4)
    shutil.move(built, moved)  # its YAMLs still name their data where it was built
    assert main(["eval", str(world["base"]), "--tasks", "midus_cloze", "--include-path", str(moved), *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: task 'midus_cloze' ({moved / 'midus_cloze.yaml'}) reads its data from {built / 'midus_cloze.jsonl'}, "
                          "which is not there: was the suite folder moved?"), err


def run_cli(*args: str, block_lm_eval: bool = False, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    prelude = "import sys\n" + ("sys.modules['lm_eval'] = None\n" if block_lm_eval else "")
    script = prelude + "from midus_surgery.cli import run\nsys.argv = ['midus-surgery', *sys.argv[1:]]\nrun()\n"
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=cwd, timeout=300, env=env)


def test_without_lm_eval_one_line_names_the_extra(world):
    proc = run_cli("eval", str(world["base"]), "--tasks", "midus_cloze", "--include-path", str(world["tasks"]), block_lm_eval=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == 'error: eval --tasks needs lm-evaluation-harness, an extra: pip install -e ".[eval]" (or pip install lm-eval)'


def test_an_lm_eval_that_does_not_import_is_said_so_not_missing(monkeypatch):
    """lm-eval installed but failing to import (a version that does not fit this transformers) was said as "needs
    lm-evaluation-harness ... pip install" (trial76 F5): the line says it does not import, and why."""
    from midus_surgery.downstream import harness
    from midus_surgery.downstream.task_guard import TaskError

    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", None)  # its HF model class fails to import
    with pytest.raises(TaskError) as err:
        harness._lm_eval()
    said = str(err.value)
    assert said.startswith("lm-evaluation-harness is installed but does not import (ModuleNotFoundError: ") and "lm_eval.models.huggingface" in said


def test_input_errors_are_one_line(world, tmp_path, capsys):
    assert main(["eval", str(world["base"]), "--tasks", "midus_clozee", "--include-path", str(world["tasks"])]) == 2
    assert "lm-eval knows no task 'midus_clozee' (did you mean midus_cloze" in capsys.readouterr().err
    assert main(["eval", str(world["base"])]) == 2
    err = capsys.readouterr().err
    assert "give --data (held-out perplexity) or --tasks" in err and "both were given" not in err
    assert main(["eval", str(world["base"]), "--data", str(tmp_path), "--tasks", "midus_cloze"]) == 2
    assert "eval: both were given; give --data (held-out perplexity) or --tasks" in capsys.readouterr().err  # trial33
    assert main(["eval", str(world["base"]), "--tasks", "midus_cloze", "--include-path", str(world["tasks"]), "--limit", "0"]) == 2
    assert "--limit must be above 0" in capsys.readouterr().err
    again = str(world["base"]) + "/."  # the same model twice was scored twice under one label (trial73 F9h)
    assert main(["eval", str(world["base"]), again, "--tasks", "midus_cloze", "--include-path", str(world["tasks"])]) == 2
    assert f"eval: {again} is {world['base']} again: name each model once" in capsys.readouterr().err
    # a task whose data cannot be read (as a Hub task without the network; here a file that is not JSON lines): one
    # line, not lm-eval's traceback (a data file that is not there at all is said before lm-eval runs: a moved suite)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "gone.jsonl").write_text('{"context": "not closed\n')  # in the task's folder, the only one it may read
    hand_written = re.sub(r"  data_sha256: \w+\n", "", (world["tasks"] / "midus_cloze.yaml").read_text())  # a task of one's own
    (broken / "midus_cloze_gone.yaml").write_text(hand_written
                                                  .replace("task: midus_cloze", "task: midus_cloze_gone")
                                                  .replace(str(world["tasks"] / "midus_cloze.jsonl"), str(broken / "gone.jsonl")))
    assert main(["eval", str(world["base"]), "--tasks", "midus_cloze_gone", "--include-path", str(broken), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: lm-eval could not read the data of midus_cloze_gone: ") and "\n" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "gone.jsonl").write_text("")
    (empty / "midus_cloze_empty.yaml").write_text((broken / "midus_cloze_gone.yaml").read_text()
                                                  .replace("task: midus_cloze_gone", "task: midus_cloze_empty")
                                                  .replace(str(broken / "gone.jsonl"), str(empty / "gone.jsonl")))
    assert main(["eval", str(world["base"]), "--tasks", "midus_cloze_empty", "--include-path", str(empty), "--quiet"]) == 2
    assert "a task has no documents (an empty data file, or a split with no rows)" in capsys.readouterr().err
    coded = tmp_path / "coded"
    coded.mkdir()
    (coded / "t.yaml").write_text("task: t\nprocess_docs: !function utils.process\n")
    assert main(["eval", str(world["base"]), "--tasks", "t", "--include-path", str(coded)]) == 2
    assert "t.yaml:2: tag !function (lm-eval imports Python for !function); pass --allow-task-code" in capsys.readouterr().err
    # a YAML that does not parse is said so; the code flag would not help (lm-eval skips the file)
    malformed = tmp_path / "malformed"
    malformed.mkdir()
    (malformed / "t.yaml").write_text("task: t\ndataset_path: json\n  bad: [unclosed\n")
    assert main(["eval", str(world["base"]), "--tasks", "t", "--include-path", str(malformed)]) == 2
    err = capsys.readouterr().err
    assert "t.yaml: not valid YAML (ScannerError" in err and "fix it, or move it out of the task folder" in err and "allow-task-code" not in err
    # counts that lm-eval would take in silence
    tasks = ["--tasks", "midus_cloze", "--include-path", str(world["tasks"])]
    with pytest.raises(SystemExit) as usage:
        main(["eval", str(world["base"]), *tasks, "--num-fewshot", "-1"])
    assert usage.value.code == 2
    assert "--num-fewshot: at least 0, got -1" in capsys.readouterr().err
    assert main(["eval", str(world["base"]), *tasks, "--limit", "1.5"]) == 2
    assert "--limit 1.5: at or above 1 it counts items per task, a whole number" in capsys.readouterr().err
    # every model loads before the first is scored: a broken second model lost the first one's scores
    broken_model = tmp_path / "broken-model"
    shutil.copytree(world["identity"], broken_model)
    (broken_model / "model.safetensors").write_bytes(b"not safetensors")
    calls = []
    import midus_surgery.downstream.harness as harness

    real = harness._lm_eval

    def counted():
        simple_evaluate, HFLM, TaskManager = real()
        return (lambda **kw: calls.append(kw) or simple_evaluate(**kw)), HFLM, TaskManager

    harness._lm_eval = counted
    try:
        assert main(["eval", str(world["base"]), str(broken_model), *tasks, "--limit", "2", "--quiet"]) == 2
    finally:
        harness._lm_eval = real
    assert "broken-model: cannot load the weights" in capsys.readouterr().err and calls == []


# Task YAMLs that run Python when lm-eval reads them, each beside a utils.py that would leave a mark
CODE_IN_TASK_YAML = {
    "tag_directive": "%TAG !x! !func\n---\ntask: t\nprocess_docs: !x!tion utils.process\n",  # spells !function
    "verbatim_tag": "task: t\nprocess_docs: !<!function> utils.process\n",
    "python_tag": "task: t\nprocess_docs: !!python/name:os.system\n",
    "include_elsewhere": "task: t\ninclude: ../elsewhere/coded.yaml\n",
    # lm-eval reads "~/x.yaml" beside the including file, not in the home folder
    "include_tilde": "task: t\ninclude: ../elsewhere/tilde.yaml\n",
    "include_missing": "task: t\ninclude: ../elsewhere/missing.yaml\n",
    "unknown_metric": "task: t\nmetric_list:\n  - metric: ./metric_script\n",
    "hf_evaluate": "task: t\nmetric_list:\n  - metric: acc\n    hf_evaluate: true\n",
    "group_inline": "group: g\ntask:\n  - task: t\n    doc_to_text: !function utils.process\n",
}
REFUSAL = {"tag_directive": "t.yaml:4: tag !function", "verbatim_tag": "t.yaml:2: tag !function",
           "python_tag": "t.yaml:2: tag tag:yaml.org,2002:python/name:os.system", "include_elsewhere": "elsewhere/coded.yaml) lies outside the task folders (--include-path",
           "include_tilde": "elsewhere/tilde.yaml) lies outside the task folders (--include-path", "include_missing": "include '../elsewhere/missing.yaml' is not a file",
           "unknown_metric": "metric './metric_script' is not one of lm-eval's", "hf_evaluate": "metric 'acc' with hf_evaluate",
           "group_inline": "t.yaml:4: tag !function"}


@pytest.mark.parametrize("case", sorted(CODE_IN_TASK_YAML))
def test_task_yaml_that_would_run_code_is_refused_before_lm_eval_reads_it(world, tmp_path, capsys, case):
    marker = tmp_path / "ran"
    for folder in ("tasks", "elsewhere"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "utils.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                                    "def process(docs):\n    return docs\n")
    (tmp_path / "elsewhere" / "coded.yaml").write_text("process_docs: !function utils.process\n")
    (tmp_path / "elsewhere" / "tilde.yaml").write_text('include: "~/coded.yaml"\n')
    (tmp_path / "elsewhere" / "~").mkdir()
    (tmp_path / "elsewhere" / "~" / "coded.yaml").write_text("process_docs: !function utils.process\n")
    (tmp_path / "tasks" / "t.yaml").write_text(CODE_IN_TASK_YAML[case])
    if case in ("tag_directive", "include_tilde"):  # the bypass is real: lm-eval's own loader imports utils.py for it
        from lm_eval.tasks._yaml_loader import load_yaml

        (tmp_path / "elsewhere" / "~" / "utils.py").write_text((tmp_path / "elsewhere" / "utils.py").read_text())
        load_yaml(tmp_path / "tasks" / "t.yaml", resolve_func=True)
        assert marker.exists()
        marker.unlink()
    assert main(["eval", str(world["base"]), "--tasks", "t", "--include-path", str(tmp_path / "tasks")]) == 2
    err = capsys.readouterr().err
    assert REFUSAL[case] in err and "pass --allow-task-code" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_a_task_folder_that_would_hang_the_check_or_read_the_kernels_files_is_one_line(tmp_path):
    """trial73: a named pipe called t.yaml waited forever; nested aliases (886 bytes) ran for minutes; a list holding itself
    and deep nesting were RecursionError tracebacks; data_files naming /proc/self/environ put the environment into the
    datasets cache, world-readable; dataset_kwargs.cache_dir made folders anywhere. Each is now one TaskError line."""
    import os

    from midus_surgery.downstream.task_guard import TaskError, check_task_folders

    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9)) + "task: t\n"
    cases = {
        "fifo": None,
        "laughs": laughs,
        "self": "task: t\nx: &l [*l]\n",
        "deep": "task: t\nx: " + "[" * 5000 + "]" * 5000 + "\n",
        "environ": "task: t\ndataset_path: text\ndataset_kwargs:\n  data_files: /proc/self/environ\n",
        "pipe_data": "task: t\ndataset_path: text\ndataset_kwargs:\n  data_files: {test: data.txt}\n",
        "cache_dir": "task: t\ndataset_path: text\ndataset_kwargs:\n  cache_dir: /tmp/anywhere\n",
    }
    said = {"fifo": "is a named pipe, not a regular file", "laughs": "its aliases expand to over 100,000 entries", "self": None,
            "deep": "nested deeper than the YAML reader goes", "environ": "lies on the kernel's proc file system, not data",
            "pipe_data": "data.txt): " , "cache_dir": "dataset_kwargs.cache_dir '/tmp/anywhere'"}
    for case, text in cases.items():
        folder = tmp_path / case
        folder.mkdir()
        if text is None:
            os.mkfifo(folder / "t.yaml")
        else:
            (folder / "t.yaml").write_text(text)
        if case == "pipe_data":
            os.mkfifo(folder / "data.txt")
        if said[case] is None:  # walked once per shared object: at once, and nothing in it to refuse (lm-eval expands laughs)
            check_task_folders([folder], allow_code=False)
            continue
        with pytest.raises(TaskError) as info:
            check_task_folders([folder], allow_code=False)
        assert said[case] in str(info.value) and len(str(info.value).splitlines()) == 1, (case, str(info.value))



@pytest.mark.parametrize("case", ["pattern_in_include", "data_dir", "pattern_to_a_pipe"])
def test_what_a_tasks_data_resolves_to_is_checked_before_it_is_read(world, tmp_path, case):
    """trial83: the YAML check refused data_files naming /proc/self/environ, but not a pattern that matches it
    (put in an included YAML too), nor a data_dir on /proc: the environment went into the datasets cache again. A
    pattern matching only a named pipe failed in datasets' words. The files datasets resolved are checked now."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    scored = ("output_type: loglikelihood\ntest_split: test\ndoc_to_text: \"{{text[:20]}}\"\ndoc_to_target: \" the\"\n"
              "metric_list:\n  - metric: acc\n")
    data = {"pattern_in_include": "  data_files:\n    test: /proc/self/envir[o]n\n",
            "data_dir": "  data_dir: /proc/self/task\n",
            "pattern_to_a_pipe": f"  data_files:\n    test: {tasks}/dat[a].txt\n"}[case]
    (tasks / "_data.inc").write_text("dataset_path: text\ndataset_kwargs:\n" + data)
    (tasks / "t.yaml").write_text("task: t\ninclude: _data.inc\n" + scored)
    if case == "pattern_to_a_pipe":
        os.mkfifo(tasks / "data.txt")
    cache = tmp_path / "datasets-cache"
    proc = run_cli("eval", str(world["base"]), "--tasks", "t", "--include-path", str(tasks), "--limit", "2", "--quiet", cwd=tmp_path,
                   env={"HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "MIDUS_TEST_SECRET": "hunter2-t83"})
    assert proc.returncode == 2, proc.stderr
    said = {"pattern_in_include": "split reads /proc/self/environ (/proc/",
            "data_dir": "dataset_kwargs '/proc/self/task' (/proc/",
            "pattern_to_a_pipe": "test split finds no data file (its pattern matches no regular file)"}[case]
    assert said in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    if case != "pattern_to_a_pipe":
        assert "it lies on the kernel's proc file system, not data" in proc.stderr and "pass --allow-task-code" in proc.stderr
    written = [f for f in cache.rglob("*") if f.is_file()] if cache.exists() else []
    assert not [f for f in written if b"hunter2-t83" in f.read_bytes()]

@pytest.mark.parametrize("case", ["local_scheme", "storage_options", "secret_outside", "include_outside", "data_dir_root", "regex",
                                  "harbor"])
def test_a_data_only_task_reads_its_own_folder_and_connects_nowhere_else(tmp_path, case):
    """trial92: data_files spelt local:///proc/self/environ passed both checks (F1); dataset_kwargs.storage_options sent the
    user's HF token to a server the task named (F2); any file the user can read (a token, an ssh key) became task rows,
    and include: read /etc/passwd (F3); data_dir: / walked the whole file system before any check (F6); a metric's regex
    that nests repeats backtracked without end (F4). trial95 F1: datasets' harbor builder read the instruction.md beside
    its task.toml, a link to the token. Refused in one line, the YAML before any model work, and what datasets resolves
    before it reads or walks it."""
    import datasets

    from midus_surgery.downstream.task_guard import TaskError, check_task_folders, checked_data_reads

    tasks, elsewhere = tmp_path / "tasks", tmp_path / "home"
    tasks.mkdir()
    elsewhere.mkdir()
    (elsewhere / "token").write_text("hf_secret\n")
    (tasks / "data.txt").write_text("a line of data\n")
    (tasks / "task.toml").write_text('[task]\nname = "h"\n')
    (tasks / "instruction.md").symlink_to(elsewhere / "token")
    head = "task: t\ndataset_path: text\n"
    yaml_text = {"local_scheme": head + "dataset_kwargs:\n  data_files: {test: 'local:///proc/self/environ'}\n",
                 "storage_options": head + "dataset_kwargs:\n  storage_options: {hf: {endpoint: 'http://127.0.0.1:9'}}\n",
                 "secret_outside": head + f"dataset_kwargs:\n  data_files: {{test: '{elsewhere / 'token'}'}}\n",
                 "include_outside": f"task: t\ninclude: {elsewhere / 'token'}\n",
                 "data_dir_root": head + "dataset_kwargs:\n  data_dir: /\n",
                 "regex": head + "metric_list:\n  - metric: exact_match\n    regexes_to_ignore: ['(.*.*)*X']\n",
                 "harbor": f"task: t\ndataset_path: harbor\ndataset_kwargs:\n  data_files: {{test: '{tasks / 'task.toml'}'}}\n"}[case]
    (tasks / "t.yaml").write_text(yaml_text)
    said = {"local_scheme": "it lies on the kernel's proc file system, not data",
            "storage_options": "dataset_kwargs.storage_options: where HF datasets connects",
            "secret_outside": "it lies outside the task folders (--include-path)",
            "include_outside": "lies outside the task folders (--include-path: give its folder as another if you trust it)",
            "data_dir_root": "it lies outside the task folders (--include-path)",
            "regex": "repeats a part that itself repeats",
            "harbor": "HF datasets' 'harbor' builder opens files besides the data files it is given"}[case]
    with pytest.raises(TaskError) as info:
        check_task_folders([tasks], allow_code=False)
    assert said in str(info.value) and "pass --allow-task-code" in str(info.value) and "\n" not in str(info.value), str(info.value)
    check_task_folders([tasks], allow_code=True)  # the user's word: the folder is trusted
    # what lm-eval hands to datasets, checked as datasets resolves it (patterns, data_dir, other spellings)
    runtime = {"local_scheme": dict(data_files={"test": "local:///proc/self/envir[o]n"}),
               "storage_options": dict(data_files={"test": str(tasks / "data.txt")}, storage_options={"hf": {"endpoint": "http://127.0.0.1:9"}}),
               "secret_outside": dict(data_files={"test": str(elsewhere / "tok[e]n")}),
               "data_dir_root": dict(data_dir="/"),
               "harbor": dict(data_files={"test": str(tasks / "task.toml")})}.get(case)
    if case == "regex":  # a fixed count inside a repeat matches one way only: a thousands separator is no risk (trial95 F10)
        (tasks / "t.yaml").write_text(yaml_text.replace("'(.*.*)*X'", "'\\d{1,3}(,\\d{3})*'"))
        check_task_folders([tasks], allow_code=False)
        # beside an alternation a fixed count matches one text many ways: 2 s at 60 characters (trial97 F5)
        (tasks / "t.yaml").write_text(yaml_text.replace("'(.*.*)*X'", "'^(a{3}|a{2})*$'"))
        with pytest.raises(TaskError, match="repeats a part that itself repeats"):
            check_task_folders([tasks], allow_code=False)
    if runtime is None:
        return
    with checked_data_reads([tasks]), pytest.raises(TaskError) as info:
        datasets.load_dataset("harbor" if case == "harbor" else "text", cache_dir=str(tmp_path / "cache"), **runtime)
    assert "pass --allow-task-code" in str(info.value), str(info.value)
    assert not list((tmp_path / "cache").rglob("*.arrow"))  # refused before datasets read a byte
    with checked_data_reads([tasks]):  # the task's own data is read
        assert datasets.load_dataset("text", data_files={"test": str(tasks / "data.txt")}, cache_dir=str(tmp_path / "cache"))["test"][0] \
            == {"text": "a line of data"}


@pytest.mark.slow
def test_a_task_template_that_reaches_python_internals_runs_only_with_allow_task_code(world, tmp_path):
    """lm-eval renders templates with a Jinja environment that is not sandboxed; without the flag
    the run renders them in jinja2's sandbox. Run from a folder that is not a git repository:
    lm-eval's `git describe` would print "fatal: not a git repository"."""
    marker = tmp_path / "ran"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    # os.open (O_WRONLY | O_CREAT), not os.system: a fork in this many-threaded process can deadlock the
    # child before it execs (seen: the run hung until its timeout)
    payload = f"{{{{ cycler.__init__.__globals__.os.open('{marker}', 65) }}}}"
    (tasks / "midus_cloze_jinja.yaml").write_text((world["tasks"] / "midus_cloze.yaml").read_text()
                                                  .replace("task: midus_cloze", "task: midus_cloze_jinja")
                                                  .replace('doc_to_text: "{{context}}"', f'doc_to_text: "{payload}{{{{context}}}}"'))
    common = ("eval", str(world["base"]), "--tasks", "midus_cloze_jinja", "--include-path", str(tasks), "--include-path", str(world["tasks"]),
              "--limit", "2")
    refused = run_cli(*common, "--quiet", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("error: a task template reaches for Python's internals or does more work than a template needs, "
                                      "refused by the sandbox (SecurityError: ")
    assert "Traceback" not in refused.stderr and not marker.exists()
    allowed = run_cli(*common, "--allow-task-code", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    assert marker.exists()  # the payload is real: lm-eval's own environment runs it
    assert "fatal" not in allowed.stderr and "midus_cloze_jinja (2)" in allowed.stdout


def test_a_task_template_that_would_run_without_end_is_one_line(world, tmp_path):
    """Nested ranges (the sandbox capped each range, not their nesting) ran until killed (trial73 F8): a render's work
    is bounded, and the run stops in one line."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    (tasks / "midus_cloze_loops.yaml").write_text((world["tasks"] / "midus_cloze.yaml").read_text()
                                                  .replace("task: midus_cloze", "task: midus_cloze_loops")
                                                  .replace('doc_to_text: "{{context}}"', f'doc_to_text: "{loops}{{{{context}}}}"'))
    refused = run_cli("eval", str(world["base"]), "--tasks", "midus_cloze_loops", "--include-path", str(tasks), "--include-path",
                      str(world["tasks"]), "--limit", "2", "--quiet", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("error: a task template reaches for Python's internals or does more work than a template "
                                      "needs, refused by the sandbox (TemplateTooCostly: a template's range() calls make over 1,000,000 "
                                      "items in one render"), refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_the_sandbox_bounds_a_renders_work_and_renders_what_tasks_do(monkeypatch):
    """Each bound of one render (trial73 F8), and what task templates do still rendering as before."""
    import lm_eval.utils
    from jinja2.exceptions import SecurityError

    from midus_surgery.downstream import task_guard

    env = task_guard.bounded_sandbox_like(lm_eval.utils.env)  # what the run renders lm-eval's templates in
    render = lambda text: env.from_string(text).render(choices=["a", "b"])  # noqa: E731
    assert render("{% for c in choices %}{{ loop.index }}. {{ c }} {% endfor %}|{{ 'ab' | regex_replace('b', 'c') }}|"
                  "{{ '-' * 3 }}|{{ 2 ** 10 }}") == "1. a 2. b |ac|---|1024"
    loop = env.from_string("{% for i in range(90000) %}{% endfor %}ok")
    assert [loop.render() for _ in range(20)] == ["ok"] * 20  # the budget is each render's, not the run's
    for text, said in (("{% for i in range(100000) %}{% for j in range(100) %}{% endfor %}{% endfor %}", "range() calls make over"),
                       ("{{ 'a' * 10**10 }}", "repeats a text of 1 characters 10,000,000,000 times"),
                       ("{{ [1, 2] * 10**8 }}", "repeats a list of 2 items"), ("{{ 3 ** 100000 }}", "over 4,096 powers"),
                       ("{{ (10**4096)**4096 }}", "a number of over 2**20 bits"),  # trial80 N2: these got past the bounds
                       ("{{ 'a'.center(1500000000) }}", "calls center with 1,500,000,000"),
                       ("{{ '%1500000000d' % 1 }}", "formats with a width over 10,000,000"),
                       ("{{ 'x\ny' | indent(1500000000) }}", "filter indent is given 1,500,000,000")):
        with pytest.raises(SecurityError, match=re.escape(said)):
            render(text)
    monkeypatch.setattr(task_guard, "REGEX_SECONDS", 0.05)
    with pytest.raises(SecurityError, match=r"regex_replace with '\(a\|aa\)\+\$' ran past 0.05 s on one document"):
        render("{{ ('a' * 36 + '!') | regex_replace('(a|aa)+$', '') }}")
    # what no bound above sees (a macro calling itself twice a level) stops at the render's time limit
    monkeypatch.setattr(task_guard, "RENDER_SECONDS", 0.5)
    with pytest.raises(SecurityError, match=r"a template render ran past 0.5 s"):
        render("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}")
    assert render("{{ '%5d' % 3 }}|{{ 'a'.center(3) }}|{{ 'a b c' | wordwrap(3) }}") == "    3| a |a b\nc"


def test_the_stderr_bootstrap_forks_no_pool(world, monkeypatch):
    """lm-eval bootstraps a perplexity's stderr in a forked multiprocessing.Pool unless told not to; a fork of
    this many-threaded process can deadlock a worker (the allow-task-code test once hung on it for 300 s)."""
    import multiprocessing

    from midus_surgery.downstream.harness import run_tasks

    def no_pool(*args, **kwargs):
        raise AssertionError("lm-eval forked a multiprocessing.Pool")

    monkeypatch.setattr(multiprocessing, "Pool", no_pool)
    monkeypatch.delenv("DISABLE_MULTIPROC", raising=False)
    out = run_tasks([world["base"]], ["midus_cloze"], include_path=[world["tasks"]], limit=3, progress=False)
    ppl = out["models"][0]["results"]["midus_cloze"]
    assert "perplexity" in ppl and "DISABLE_MULTIPROC" not in os.environ  # bootstrapped here; the switch put back


def test_a_hub_failure_while_reading_a_tasks_data_is_not_blamed_on_the_model(world, capsys, monkeypatch):
    """A data fetch that failed inside huggingface_hub was said as "could not score ... with the model" (trial92 N2)."""
    import lm_eval
    from huggingface_hub.utils import validate_repo_id

    def fetch_fails(**kwargs):
        validate_repo_id("not a repo id!")  # raises inside huggingface_hub, as a refused or failed download does

    monkeypatch.setattr(lm_eval, "simple_evaluate", fetch_fails)
    capsys.readouterr()
    assert main(["eval", str(world["base"]), "--tasks", "midus_cloze", "--include-path", str(world["tasks"]), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: lm-eval could not read the data of midus_cloze: ") and "(raised at huggingface_hub/" in err, err
    assert "with the model" not in err and len(err.strip().splitlines()) == 1, err


def test_an_unreachable_hub_fails_a_hub_task_at_once_and_local_tasks_still_run(world, capsys, monkeypatch, tmp_path):
    """Offline, `--tasks wikitext` retried every file five times with back-off (47 s of "Retrying in
    8s" lines) before its error. Now an unreachable Hub means the datasets cache only, said in the line."""
    from huggingface_hub import constants

    from midus_surgery.downstream import harness

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as a user without HF_HUB_OFFLINE set
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(harness, "_hub_unreachable", lambda: "huggingface.co is unreachable from here (test)")
    capsys.readouterr()
    assert main(["eval", str(world["base"]), "--tasks", "wikitext", "--limit", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: lm-eval could not read the data of wikitext: ") and len(err.strip().splitlines()) == 1
    assert err.rstrip().endswith("; huggingface.co is unreachable from here (test), so only datasets in the local datasets cache can be read")
    assert constants.HF_HUB_OFFLINE is False  # offline for the evaluation only
    # the offline suite's data is local: it scores as it does online
    assert main(["eval", str(world["base"]), "--tasks", "midus_cloze", "--include-path", str(world["tasks"]), "--limit", "3", "--quiet"]) == 0
    assert "midus_cloze" in capsys.readouterr().out


def test_an_error_in_the_models_forward_is_not_blamed_on_the_unreachable_hub(world, capsys, monkeypatch):
    """With the Hub unreachable every lm-eval failure ended "..., so only datasets in the local datasets cache
    can be read", a RuntimeError in the model's forward too (helper-61): now only a failure to read something."""
    from huggingface_hub import constants
    from transformers import LlamaForCausalLM

    from midus_surgery.downstream import harness

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(harness, "_hub_unreachable", lambda: "huggingface.co is unreachable from here (test)")

    def broken(self, *args, **kwargs):
        raise RuntimeError("shapes do not match in the forward")

    monkeypatch.setattr(LlamaForCausalLM, "forward", broken)
    capsys.readouterr()
    args = ["eval", str(world["base"]), "--tasks", "midus_cloze", "--include-path", str(world["tasks"]), "--limit", "2", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: lm-eval could not score midus_cloze with the model ") and len(err.strip().splitlines()) == 1, err
    assert "RuntimeError: shapes do not match in the forward" in err and "unreachable" not in err, err
    assert "(raised at tests/test_downstream.py:" in err or "(raised at test_downstream.py:" in err, err  # where (trial73 F9c)
    assert harness._reading_failed(FileNotFoundError(2, "No such file")) and not harness._reading_failed(RuntimeError("x"))
    try:  # a library's error raised from an OSError counts, through the chain
        try:
            raise ConnectionError("no route")
        except ConnectionError as cause:
            raise ValueError("the dataset could not be built") from cause
    except ValueError as exc:
        assert harness._reading_failed(exc)


def test_the_offline_suite_renders_in_the_sandbox(world, capsys):
    from midus_surgery.downstream.task_guard import check_task_folders

    check_task_folders([world["tasks"]], allow_code=False)  # plain data: nothing refused


def test_a_next_sentence_is_never_one_a_dropped_sentence_stood_before():
    """The builder paired neighbours of the filtered list: with a non-prose sentence between two prose ones, the
    keyed 'next' sentence came later in the document (53% of the git-docs items, trial54)."""
    import random

    from midus_surgery.downstream.task_suite import next_sentence_items, sentence_slots

    first = ("The first sentence here has plenty of plain words. See `git add` for the details of it all. "
             "The third sentence also has plenty of plain words. And the fourth one follows the third right away.")
    others = [sentence_slots(f"Another document sentence number {k} has words enough in it. Yet another one follows it here in order.")
              for k in range(4)]
    slots = sentence_slots(first)
    assert slots[1] is None and slots[0] and slots[2]
    items = next_sentence_items([slots, *others], 50, random.Random(0))
    pairs = {(item["context"], item["choices"][item["label"]]) for item in items}
    assert (slots[0], slots[2]) not in pairs and (slots[2], slots[3]) in pairs


def test_sentences_are_prose_only():
    text = ("These entries are sorted by name then by stage. == Untracked cache The cache saves the state of the tree. "
            "Each committer and author is shown in the list. + Currently available providers are listed in the table here. "
            "A plain sentence with enough words in it. See `git add` for the details of it all.")
    assert sentences(text) == ["A plain sentence with enough words in it."]


def test_the_suite_refuses_to_write_over_its_text_and_needs_documents(world, tmp_path):
    from midus_surgery.errors import MidusError

    with pytest.raises(MidusError, match="inside"):  # OutputError, the output-safety rule
        build_task_suite([str(world["text"])], world["text"] / "tasks")
    few = write_documents(tmp_path / "few", n=2)
    with pytest.raises(MidusError, match="needs at least 4"):
        build_task_suite([str(few)], tmp_path / "suite")
    assert not (tmp_path / "suite").exists()
    proc = subprocess.run([sys.executable, "tools/make_task_suite.py", str(few), "--out", str(tmp_path / "suite")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.startswith("error: task text:") and len(proc.stderr.strip().splitlines()) == 1


def test_several_models_load_once_each_and_one_failing_late_keeps_the_scores_before_it(world, capsys, monkeypatch):
    """eval --tasks loaded every model twice (once to check it, dropped); now the check reads headers and each model
    loads once. One that still fails at its real load ends the run after the table (or JSON) of those scored before it."""
    from collections import Counter

    from midus_surgery.train import evaluate
    from midus_surgery.train.evaluate import ModelLoadError

    loader, loads = evaluate.load_causal_lm, Counter()

    def counted(path, **kwargs):
        loads[str(path)] += 1
        return loader(path, **kwargs)

    monkeypatch.setattr(evaluate, "load_causal_lm", counted)
    models = [str(world["base"]), str(world["identity"])]
    common = ["--tasks", "midus_cloze", "--include-path", str(world["tasks"]), "--limit", "3", "--quiet"]
    assert main(["eval", *models, *common, "--json"]) == 0
    assert [r["model"] for r in json.loads(capsys.readouterr().out)["models"]] == models
    assert loads == {m: 1 for m in models}

    def fails_on_the_second(path, **kwargs):
        if str(path) == models[1]:
            raise ModelLoadError("bytes gone")
        return loader(path, **kwargs)

    monkeypatch.setattr(evaluate, "load_causal_lm", fails_on_the_second)
    assert main(["eval", *models, *common, "--json"]) == 2
    captured = capsys.readouterr()
    partial = json.loads(captured.out)
    assert [r["model"] for r in partial["models"]] == models[:1] and partial["models"][0]["results"]["midus_cloze"]["items"] == 3
    assert captured.err == f"error: {models[1]}: bytes gone\n"
    assert main(["eval", *models, *common]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].split()[:4] == ["task", "(items)", "metric", "base"] and "identity" not in captured.out
    assert captured.err == f"error: {models[1]}: bytes gone\n"


def test_two_models_never_share_a_column_label(tmp_path, monkeypatch):
    """runs/a/final and x/runs/a/final were both labelled "a/final" in the --tasks table (trial65): each label takes as
    much of its path as tells it from the others; a run's export keeps its run's name; one model given twice, one label."""
    from midus_surgery.downstream.harness import model_labels

    monkeypatch.chdir(tmp_path)
    labels = model_labels(["runs/a/final", "x/runs/a/final", "base", "out/dus", "other/dus", "base"])
    assert labels == [f"{tmp_path.name}/runs/a/final", "x/runs/a/final", "base", "out/dus", "other/dus", "base"]
    assert model_labels(["runs/a/final", "runs/b/final", "out/midus"]) == ["a/final", "b/final", "midus"]


def test_names_with_control_characters_are_escaped_in_the_table():
    """A task or model name with ESC, CR or LF was echoed raw into the --tasks table, colouring the terminal or
    splitting a row (trial73 F9g): each shows as its escape, and each row stays one line."""
    from midus_surgery.downstream.harness import format_table

    result = {"tasks": ["t_\x1b[31mred"], "models": [{"model": "out/a\rb", "results": {"t_\x1b[31mred": {"acc": 0.5, "items": 4}}}]}
    table = format_table(result)
    assert "\x1b" not in table and "\r" not in table and len(table.splitlines()) == 3, table
    assert "t_\\x1b[31mred (4)" in table and "a\\rb" in table.splitlines()[0]


def test_bad_task_flags_are_named_not_blamed_on_the_model(world, capsys, monkeypatch):
    """--seed out of numpy's range and an empty --tasks failed only after the first model loaded, as "lm-eval could not
    score ... with the model" (and "could not score  with"); they are refused before any model is read, naming the flag.
    More few-shot examples than the task's pool holds names --num-fewshot, not the model."""
    import midus_surgery.train.evaluate as evaluate

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    suite = ["--include-path", str(world["tasks"]), "--quiet"]
    with monkeypatch.context() as patched:
        patched.setattr(evaluate, "load_causal_lm", no_load)
        for seed in ("-1", "99999999999999999999", str(2**32)):
            with pytest.raises(SystemExit) as stop:
                main(["eval", str(world["base"]), "--tasks", "midus_cloze", "--seed", seed, *suite])
            assert stop.value.code == 2
            assert f"argument --seed: between 0 and 2**32 - 1 (4294967295), got {int(seed)}" in capsys.readouterr().err
        for tasks in ([""], [","], ["midus_cloze", " "]):
            assert main(["eval", str(world["base"]), "--tasks", *tasks, *suite]) == 2
            err = capsys.readouterr().err
            assert err.strip() == "error: --tasks: an empty task name (--tasks NAME..., space or comma separated)", err
    assert main(["eval", str(world["base"]), "--tasks", "midus_cloze", "--num-fewshot", "100000", "--limit", "2", *suite]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --num-fewshot 100000: more few-shot examples than a task of midus_cloze has") and "\n" not in err, err
    assert "with the model" not in err


def test_a_model_whose_log_likelihoods_are_not_numbers_gets_no_score_and_exit_1(world, capsys, tmp_path):
    """A model whose activations overflow scored acc 1.0000 ± 0.0000 and perplexity nan, exit 0: lm-eval's argmax over
    NaN choices picks the first (trial136 F2). The table (or JSON) is still printed, every model's, then a note naming
    the broken one and an error line, exit 1, as eval --data does for a NaN loss. Task names are stripped ("a, b")."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-base"
    shutil.copytree(world["base"], broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")  # every logit NaN, as an fp16 overflow makes them
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    common = ["--tasks", "midus_cloze, midus_next_sentence", "--include-path", str(world["tasks"]), "--limit", "3", "--quiet"]
    assert main(["eval", str(world["base"]), str(broken), *common, "--json"]) == 1
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["tasks"] == ["midus_cloze", "midus_next_sentence"]
    good, bad = result["models"]
    assert good["loglikelihoods"] == bad["loglikelihoods"] > 0 and good["loglikelihoods_not_numbers"] == 0
    assert bad["loglikelihoods_not_numbers"] == bad["loglikelihoods"]
    err = captured.err.strip().splitlines()
    assert err[-2] == (f"note: {broken}: {bad['loglikelihoods']:,} of the {bad['loglikelihoods']:,} log-likelihoods its scores stand "
                       "on are not numbers: its weights hold NaN or inf, or its activations overflow in float32")
    assert err[-1] == f"error: eval: no scores for {broken}: log-likelihoods that are not numbers (the note above says why)"
    assert main(["eval", str(world["base"]), *common]) == 0  # a sound model: exit 0, no note
    assert "note:" not in capsys.readouterr().err


TWO_FILTERS = """task: twofilter
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 2
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
filter_list:
  - name: strict
    filter:
      - function: regex
        regex_pattern: "ZZZ(\\\\d)"
      - function: take_first
  - name: loose
    filter:
      - function: take_first
"""

TAGGED = """task: tiny_cloze
tag: tinytag
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + target}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_each_filter_is_its_own_row_and_a_tag_is_its_tasks(world, tmp_path, capsys):
    """lm-eval reports a metric once per filter (gsm8k: exact_match,strict-match and exact_match,flexible-extract): cut at
    the comma, both wrote to one `exact_match`, the last read (trial146 F1). A tag (ai2_arc) is scored as its tasks, which
    lm-eval reports by their own names: the table was its header alone, exit 0 (F3)."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    # the strict filter finds no "ZZZ<digit>" in any generation and gives "[invalid]", the target; the loose one does not
    (tasks / "q.jsonl").write_text("".join(json.dumps({"q": f"the cat sat on the {w}", "a": "[invalid]"}) + "\n" for w in ("mat", "log", "tree")))
    (tasks / "c.jsonl").write_text("".join(json.dumps({"context": f"the {w} sat on the", "target": "mat"}) + "\n" for w in ("cat", "dog")))
    (tasks / "twofilter.yaml").write_text(TWO_FILTERS.format(data=tasks / "q.jsonl"))
    (tasks / "tagged.yaml").write_text(TAGGED.format(data=tasks / "c.jsonl"))
    assert main(["eval", str(world["base"]), "--tasks", "twofilter", "tinytag", "--include-path", str(tasks), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tasks"] == ["twofilter", "tiny_cloze"], result["tasks"]
    scores = result["models"][0]["results"]
    assert (scores["twofilter"]["exact_match (strict)"], scores["twofilter"]["exact_match (loose)"]) == (1.0, 0.0), scores
    assert "exact_match" not in scores["twofilter"] and scores["tiny_cloze"]["items"] == 2 and "acc" in scores["tiny_cloze"]
    assert {"exact_match (strict)_stderr", "exact_match (loose)_stderr"} <= set(scores["twofilter"]), scores  # docs/evaluate.md
    assert result["settings"]["task_files"] == {"twofilter": str(tasks / "twofilter.yaml"), "tiny_cloze": str(tasks / "tagged.yaml")}
    assert main(["eval", str(world["base"]), "--tasks", "tinytag", "--include-path", str(tasks), "--quiet"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 3 and rows[2].split()[:3] == ["tiny_cloze", "(2)", "acc"], rows
