"""An offline task suite for lm-evaluation-harness, built from plain text the project already fetches.

The paper's tasks (MMLU, ARC, PIQA...) need their datasets from the Hugging Face Hub. These two
need only a folder of documents (e.g. the Debian documentation `tools/fetch_corpus.py` fetches),
so downstream evaluation runs offline, in tests and in the README's demo:

- ``midus_next_sentence`` (multiple choice): a sentence, then four candidates for the sentence
  that follows it in its document: the true one (the very next sentence: both are prose, nothing
  dropped between them) and three sentences of similar length drawn from other documents. Scored by lm-eval as ``acc`` and ``acc_norm``.
- ``midus_cloze`` (LAMBADA-like): a sentence without its last word; the model must predict the
  word. Scored as ``acc`` (the word is the greedy continuation) and ``perplexity``.

``build_task_suite`` writes one JSONL file of items and one lm-eval task YAML per task (the
YAML names its data file by absolute path), into a directory that appears whole. The YAML has
no ``!function``: loading the suite runs no code.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

from midus_surgery.downstream.harness import TaskError
from midus_surgery.train.config import DIR_GLOB

TASKS = ("midus_next_sentence", "midus_cloze")
SUITE_KIND = "task suite"  # the output_dir marker of a suite directory
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
WORD = re.compile(r"^[A-Za-z][a-z]{3,}$")
# headings, rules, literals, links, and AsciiDoc/Markdown markers standing alone (`== Title`,
# a `+` continuation, a `- ` list item): not prose
MARKUP = re.compile(r"([-=~*_#^.+])\1\1|::|[`${}<>|\\\[\]]|(?:^|\s)(?:=+|\+|-|\*)(?=\s)")

NEXT_SENTENCE_YAML = """task: midus_next_sentence
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  source: {source}
  data_sha256: {digest}
"""

CLOZE_YAML = """task: midus_cloze
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
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  source: {source}
  data_sha256: {digest}
"""


def _is_prose(s: str, min_words: int, max_words: int) -> bool:
    if not (min_words <= len(s.split()) <= max_words and s[-1] in ".!?") or MARKUP.search(s):
        return False
    visible = [c for c in s if not c.isspace()]
    return sum(c.isalpha() for c in visible) >= 0.85 * len(visible)


def sentence_slots(text: str, min_words: int = 6, max_words: int = 40) -> list[str | None]:
    """Every sentence of a document in order (whitespace joined, split after . ! ? before a capital),
    None where it is not prose: fewer than ``min_words`` or more than ``max_words`` words, no end
    mark, markup, or not mostly letters. Kept in place, so that neighbours stay neighbours."""
    return [s if _is_prose(s, min_words, max_words) else None for s in SENTENCE_END.split(" ".join(text.split()))]


def sentences(text: str, min_words: int = 6, max_words: int = 40) -> list[str]:
    """The prose sentences of a document (``sentence_slots`` less the rest)."""
    return [s for s in sentence_slots(text, min_words, max_words) if s is not None]


def next_sentence_items(documents: list[list[str | None]], n: int, rng: random.Random) -> list[dict]:
    """Up to ``n`` items: a sentence, the one right after it in its document (both prose: a pair with a
    dropped sentence between was keyed as next, trial54), three from other documents; each context once."""
    pairs = [(d, i) for d, slots in enumerate(documents) for i in range(len(slots) - 1) if slots[i] and slots[i + 1]]
    rng.shuffle(pairs)
    pool = [(d, s) for d, slots in enumerate(documents) for s in slots if s]
    followers: dict[str, set[str]] = {}  # a sentence -> every sentence that follows it somewhere: never a distractor
    for slots in documents:
        for a, b in zip(slots, slots[1:]):
            if a and b:
                followers.setdefault(a, set()).add(b)
    items, used = [], set()
    for d, i in pairs:
        if len(items) == n:
            break
        context, true = documents[d][i], documents[d][i + 1]
        if context in used:  # documentation repeats passages across files: one item per context
            continue
        used.add(context)
        others = list(dict.fromkeys(s for od, s in rng.sample(pool, min(len(pool), 64)) if od != d and s not in followers[context]))
        others.sort(key=lambda s: abs(len(s) - len(true)))  # similar length: length alone must not give it away
        if len(others) < 3:
            continue
        choices = [true, *others[:3]]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(true)})
    return items


def cloze_items(documents: list[list[str | None]], n: int, rng: random.Random) -> list[dict]:
    """Up to ``n`` items: a prose sentence without its last word (a plain word of 4+ letters), and the
    word; each sentence once (documentation repeats passages across files)."""
    candidates = {}
    for slots in documents:
        for s in slots:
            if s is None:
                continue
            *head, last = s[:-1].split(" ")
            if WORD.match(last) and len(head) >= 5:
                candidates.setdefault(s, {"context": " ".join(head), "target": last})
    rows = list(candidates.values())
    rng.shuffle(rows)
    return rows[:n]


def build_task_suite(sources: list[str], out: Path, *, items: int = 500, seed: int = 0, text_field: str = "text",
                     dir_glob=DIR_GLOB) -> dict:
    """Write the suite's data and task YAMLs into ``out`` (whole or not at all); the counts per task."""
    from midus_surgery.io.output_dir import atomic_directory, check_output_dir, input_root
    from midus_surgery.train import data as D

    files = D.resolve_inputs(sources, Path.cwd(), dir_glob, what="task text")
    out = check_output_dir(out, kind=SUITE_KIND, inputs=[(f"text ({p})", input_root(p)) for p in sources], reuse=True, flag=None)
    documents = [slots for slots in (sentence_slots(doc) for f in files for doc in D.iter_documents(f, text_field))
                 if sum(s is not None for s in slots) >= 2]
    if len(documents) < 4:
        raise TaskError(f"task text: {len(documents)} document(s) with two prose sentences or more in {', '.join(sources)}; "
                         "the suite needs at least 4 (distractors come from other documents)")
    rng = random.Random(seed)
    made = {"midus_next_sentence": next_sentence_items(documents, items, rng), "midus_cloze": cloze_items(documents, items, rng)}
    for name, rows in made.items():
        if not rows:
            raise TaskError(f"task text: no item for {name} in {', '.join(sources)}")
    source = json.dumps(", ".join(sources))
    with atomic_directory(out, kind=SUITE_KIND, replace=True) as tmp:
        for name, rows in made.items():
            data = "".join(json.dumps(r) + "\n" for r in rows).encode()
            (tmp / f"{name}.jsonl").write_bytes(data)
            template = NEXT_SENTENCE_YAML if name == "midus_next_sentence" else CLOZE_YAML
            # the data's digest: a copy of the suite still names the original's data, which a rebuild may change (trial56)
            (tmp / f"{name}.yaml").write_text(template.format(data=json.dumps(str(out / f"{name}.jsonl")), source=source,
                                                              digest=hashlib.sha256(data).hexdigest()))
    return {name: len(rows) for name, rows in made.items()}
