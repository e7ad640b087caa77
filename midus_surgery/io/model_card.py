"""The model card's training section, as text: apply writes it "not trained yet", and each export
of a training run adds the line that says how it was trained.

The section sits between two HTML comments (invisible where the card is rendered, on the Hub
too), so an export finds it in a card apply wrote, edited or not, and changes nothing outside it;
a card without the section (a model midus-surgery did not make) is kept as its author wrote it,
with the section added at its end: the export is another model than the one the card describes.
"""

from __future__ import annotations

from pathlib import PurePath

TRAINING_START = "<!-- midus-surgery: training -->"
TRAINING_END = "<!-- /midus-surgery: training -->"
NOT_TRAINED = "Not trained yet: continue pre-training it (`midus-surgery train`)."


def training_section(body: str) -> str:
    """The section as apply writes it, holding ``body``."""
    return f"{TRAINING_START}\n{body}\n{TRAINING_END}"


# apply's sentence for an output that computes its base's function, and what a trained export's card says instead: in a
# trained model's card the present tense read as a claim about the trained weights (trial82 F13)
STARTS_AS_BASE = "It starts computing the base's function exactly: every inserted block was checked to add nothing until trained."
STARTED_AS_BASE = ("As applied, before any training, it computed the base's function exactly: every inserted block was checked "
                   "to add nothing until trained.")
SETTINGS = " Every setting: `midus_train.json`."  # true of the newest run's line only: an export replaces the file


def card_with_training(card: str, line: str) -> str:
    """``card`` with ``line`` added to its training section (replacing "not trained yet"); a card
    without the section (its author's) gets one at its end, under a heading."""
    card = card.replace(STARTS_AS_BASE, STARTED_AS_BASE)
    start, end = card.find(TRAINING_START), card.find(TRAINING_END)
    if start < 0 or end < start:
        return card.rstrip("\n") + "\n\n## Training by midus-surgery\n\n" + training_section(line) + "\n"
    earlier = card[start + len(TRAINING_START):end].strip()
    kept = [earlier.replace(SETTINGS, "")] if earlier and earlier != NOT_TRAINED else []  # an earlier run's lines stay: a chain of trainings
    return card[:start] + training_section("\n\n".join([*kept, line])) + card[end + len(TRAINING_END):]


def training_line(summary: dict) -> str:
    """One paragraph from midus_train.json's ``summary``: how much, on what, how, and the held-out result."""
    cfg = summary.get("config") or {}
    data = cfg.get("data") or {}
    # folder and file names, not the paths: a card is published, the paths are this machine's
    corpora = ", ".join(f"`{PurePath(p).name or p}`" for p in data.get("train") or []) or "its data"
    how = [f"freeze: {cfg.get('freeze')}"] if cfg.get("freeze") else []
    if summary.get("precision"):
        how.append(f"precision {summary['precision']}")
    lr, memory_lr = (cfg.get("optim") or {}).get("lr"), (cfg.get("memory") or {}).get("lr")
    if cfg.get("freeze") == "memory-only":  # only the memory tables trained: at memory.lr (trial53 read optim.lr, which trained nothing)
        if memory_lr is not None:
            how.append(f"memory lr {memory_lr:g}")
    elif lr is not None:
        memory = memory_lr is not None and memory_lr != lr and summary.get("memory_trained", True)  # older summaries did not say
        how.append(f"lr {lr:g}" + (f", memory lr {memory_lr:g}" if memory else ""))
    if (cfg.get("memory") or {}).get("retrieval") == "frozen":
        how.append("memory retrieval frozen")
    steps = summary.get("steps", 0)
    text = (f"Trained by `midus-surgery train`: {steps:,} step{'' if steps == 1 else 's'}, {summary.get('tokens', 0):,} tokens of {corpora}"
            f" (blocks of {data.get('block_size', '?')} tokens){'; ' + ', '.join(how) if how else ''}.")
    held = summary.get("held_out")
    if isinstance(held, dict) and held.get("eval_loss") is not None:
        named = data.get("held_out")
        source = f" of {', '.join(f'`{PurePath(p).name or p}`' for p in named)}" if named else ""
        stored = summary.get("export_dtype")
        rounded = (f"; of the float32 weights trained, before they were stored as {stored}: `midus-surgery eval` measures "
                   "the stored ones") if stored and stored != "float32" else ""  # trial48: the card's number was not the export's
        text += f" Held-out loss {held['eval_loss']:.4f}, perplexity {held['eval_ppl']:.3f} ({held.get('eval_tokens', 0):,} tokens{source}{rounded})."
    return text + SETTINGS
