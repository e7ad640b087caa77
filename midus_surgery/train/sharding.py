"""FSDP where accelerate would not shard.

On a machine without an accelerator, accelerate turns an FSDP config (``accelerate launch
--config_file fsdp.yaml``, which sets ``ACCELERATE_USE_FSDP`` and the ``FSDP_*`` variables) into
DDP without a word (every process then holds the whole model), or fails building the FSDP
plugin (``sync_module_states`` wants an accelerator). torch's FSDP2 (``fully_shard``) runs on CPU
over gloo, so for an FSDP2 config the run switches accelerate to it itself, with the plugin
accelerate builds from the same variables; an FSDP1 config runs as DDP. Either way one line says so.
"""

from __future__ import annotations

import os


def _asked_for_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _fsdp_version() -> str:
    return os.environ.get("FSDP_VERSION", "1")  # accelerate's default


# The oldest accelerate whose FSDP2 runs were checked to end as the single-process run does (tests/test_fsdp.py, each
# version loaded ahead of the installed one): 1.15.0 and 1.16.0 do; 1.6.0 (the first with FSDP2), 1.11.0 and 1.14.0
# end a shared memory bank apart (trial76 F3b)
FSDP2_ACCELERATE = (1, 15)


def before_accelerator(on_cpu: bool) -> str | None:
    """Settle an FSDP config on CPU before accelerate reads it; the line to print, or None.

    FSDP1 cannot shard here: the config is set aside (the run is DDP). FSDP2's
    ``sync_module_states`` is turned off: every process loads the same weights from disk, so
    there is nothing to broadcast, and accelerate refuses it without an accelerator."""
    if _asked_for_fsdp() and _fsdp_version() == "2":
        _check_accelerate_for_fsdp2()
    if not (on_cpu and _asked_for_fsdp()):
        return None
    if _fsdp_version() != "2":
        os.environ["ACCELERATE_USE_FSDP"] = "false"
        return (f"fsdp: accelerate cannot shard with FSDP{_fsdp_version()} on CPU, so this run is DDP "
                "(every process holds the whole model); fsdp_version: 2 shards on CPU")
    if os.environ.get("FSDP_SYNC_MODULE_STATES", "false").lower() == "true":
        os.environ["FSDP_SYNC_MODULE_STATES"] = "false"
    return None


def _check_accelerate_for_fsdp2() -> None:
    import accelerate

    from midus_surgery.errors import TrainingError

    found = tuple(int(part) for part in accelerate.__version__.split(".")[:2] if part.isdigit())
    if found < FSDP2_ACCELERATE:
        raise TrainingError(f"an FSDP2 run needs accelerate {'.'.join(map(str, FSDP2_ACCELERATE))} or later (the oldest checked "
                            f"to train as one process does; 1.14 ended with a shared memory bank apart), and this is "
                            f"accelerate {accelerate.__version__}: pip install -U \"accelerate>={'.'.join(map(str, FSDP2_ACCELERATE))}\"")


def one_process_note(processes: int) -> str | None:
    """``accelerate launch --num_processes N`` without ``--multi_gpu`` (or an FSDP config) starts one
    process: its simple launcher sets the rendezvous address for N but no world size. Said, not guessed."""
    launched_by_accelerate = "ACCELERATE_USE_CPU" in os.environ
    if processes == 1 and launched_by_accelerate and "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ:
        return ("note: one process: accelerate launch --num_processes N starts N processes only with --multi_gpu "
                "(also on CPU, where it gives DDP over gloo; leave out --cpu, which accelerate refuses beside it) "
                "or a config file that says so")
    return None


def after_accelerator(acc) -> str | None:
    """Switch a CPU run under an FSDP2 config from accelerate's silent DDP to FSDP2; the line to
    print, or None when there is nothing to say (no FSDP config, or accelerate already shards)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not _asked_for_fsdp() or acc.distributed_type == DistributedType.FSDP:
        return None
    if acc.num_processes == 1:
        return "fsdp: one process, nothing to shard: the run is a single process"
    plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* variables, as accelerate would
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    # accelerate decides the distributed type once, in the shared process states it and its FSDP
    # helpers read (PartialState and AcceleratorState each keep a copy): set both.
    PartialState().distributed_type = DistributedType.FSDP
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    return (f"fsdp: accelerate runs FSDP configs as DDP on {acc.device.type}; this run shards with torch's FSDP2 "
            f"over {acc.state.backend} itself (the same plugin settings)")


def launcher_precision_note(precision: str) -> str | None:
    """``accelerate launch --mixed_precision X`` (ACCELERATE_MIXED_PRECISION) when the run uses another: the config's
    ``precision`` decides, and the launcher's ask was ignored without a word (trial87 F10). ``precision``: the run's."""
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if asked in ("no", "bf16" if precision == "bf16" else "no"):
        return None
    return (f"note: accelerate launch asked for mixed precision {asked}; the run uses the config's precision, {precision} "
            "(precision: in the config, or precision=... on the command line, sets it)")
