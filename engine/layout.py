"""Check an experiment's parallel layout against the model and the launch before any process group
exists, so a layout that cannot work fails at once on every rank with every problem and the key
to change, instead of hanging in a collective or failing deep inside megatron-core.

The generic checks (TP x PP against the world size, the global batch against micro-batch x DP)
are here; what the model's dimensions allow (heads and FFN width by TP, layers by PP) comes from
the family's `check_layout`. With the problems comes one command line that fits: the user's own
arguments with only the offending values changed.
"""
from __future__ import annotations

import shlex

from engine.schema import BARE_KEYS
from parallel.dims import ParallelDims, ParallelLayoutError

TP_KEY, PP_KEY = "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size"
BATCH_KEY = "trainer.global_batch_size"


def accumulation_steps(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    per_pass = micro_batch_size * dp_size
    if global_batch_size % per_pass:
        raise ValueError(
            f"trainer.global_batch_size={global_batch_size} is not divisible by trainer.micro_batch_size="
            f"{micro_batch_size} x data-parallel size {dp_size} = {per_pass}"
        )
    return global_batch_size // per_pass


def check_divides(problems: list, key: str, value: int, degree_key: str, degree: int) -> None:
    """Append a problem when `degree` does not divide `value` (heads by TP, layers by PP...)."""
    if degree and value % degree:
        problems.append(f"{key}={value} is not divisible by {degree_key}={degree}")


def model_problems(cfg, family, tp: int, pp: int) -> list[str]:
    return list(family.check_layout(cfg, tp, pp))


def layout_problems(cfg, world_size: int, family) -> list[str]:
    """Every reason this layout cannot run on `world_size` processes (empty when it can)."""
    par, trainer = cfg.parallel, cfg.trainer
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    problems = []
    for key, value in ((TP_KEY, tp), (PP_KEY, pp)):
        if not isinstance(value, int) or value < 1:
            problems.append(f"{key.split('.')[-1]} must be a positive integer, got {value!r}")
    if problems:
        return problems
    if world_size % (tp * pp):
        problems.append(f"world size {world_size} is not divisible by tensor_model_parallel_size={tp} x "
                        f"pipeline_model_parallel_size={pp} = {tp * pp}")
    if par.sequence_parallel and tp == 1:
        problems.append("parallel.sequence_parallel=true needs tensor_model_parallel_size > 1")
    problems.extend(model_problems(cfg, family, tp, pp))
    if not world_size % (tp * pp):
        dp = world_size // (tp * pp)
        try:
            accumulation_steps(trainer.global_batch_size, trainer.micro_batch_size, dp)
        except ValueError as exc:
            problems.append(f"{exc} (layout TP={tp} PP={pp} DP={dp})")
        except ZeroDivisionError:
            pass  # micro_batch_size=0: the config's range check names it
    return problems


def validate_layout(cfg, world_size: int, family, argv: list[str] | None = None) -> ParallelDims:
    """The degrees of a layout that can run, or `ParallelLayoutError` listing every problem and a
    command that fits (built from `argv`, the user's own arguments)."""
    problems = layout_problems(cfg, world_size, family)
    if not problems:
        par = cfg.parallel
        return ParallelDims(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, world_size)
    if len(problems) == 1:
        lines = [problems[0]]
    else:
        lines = [f"the parallel layout cannot run ({len(problems)} problems):"] + [f"  - {p}" for p in problems]
    suggestion = suggest_command(cfg, world_size, family, argv)
    if suggestion:
        lines.append(suggestion)
    raise ParallelLayoutError("\n".join(lines))


def _fits(cfg, world_size: int, family, tp: int, pp: int) -> bool:
    return not world_size % (tp * pp) and not model_problems(cfg, family, tp, pp)


def suggest_command(cfg, world_size: int, family, argv: list[str] | None) -> str | None:
    """One launch that fits: more processes when only the world size is short, else the nearest
    TP/PP the model and the world size allow, else a global batch that divides."""
    par, trainer = cfg.parallel, cfg.trainer
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if not (isinstance(tp, int) and isinstance(pp, int) and tp >= 1 and pp >= 1):
        return None
    argv = list(argv or [])
    changes = {}
    if not model_problems(cfg, family, tp, pp):
        nproc = world_size if not world_size % (tp * pp) else tp * pp * max(1, world_size // (tp * pp))
    else:
        candidates = [(t, p) for t in range(1, max(tp, 1) + 1) for p in range(1, max(pp, 1) + 1)
                      if _fits(cfg, world_size, family, t, p)]
        if not candidates:
            return None
        t, p = max(candidates, key=lambda c: (c[0] * c[1], c[0]))
        changes.update({TP_KEY: t, PP_KEY: p})
        tp, pp, nproc = t, p, world_size
    dp = nproc // (tp * pp)
    per_pass = trainer.micro_batch_size * dp
    if per_pass > 0 and trainer.global_batch_size % per_pass:
        changes[BATCH_KEY] = max(per_pass, -(-trainer.global_batch_size // per_pass) * per_pass)
    args = _rewrite_args(argv, changes, family)
    launcher = "python" if nproc == 1 else f"torchrun --nproc_per_node={nproc}"
    return f"a layout that fits: `{launcher} {family.entry_point} {' '.join(shlex.quote(a) for a in args)}`".rstrip()


def _canonical_key(arg_key: str, family) -> str:
    key = arg_key.strip().lstrip("+")
    key = BARE_KEYS.get(key, key)
    return family.config_aliases.get(key, key)


def _rewrite_args(argv: list[str], changes: dict, family) -> list[str]:
    """`argv` with the overrides of `changes`' keys replaced (in place, else appended)."""
    out, done = [], set()
    for arg in argv:
        key = _canonical_key(arg.split("=", 1)[0], family) if "=" in arg and not arg.startswith("--") else None
        if key in changes:
            if key not in done:
                out.append(f"{arg.split('=', 1)[0]}={changes[key]}")
                done.add(key)
            continue
        out.append(arg)
    for key, value in changes.items():
        if key not in done:
            bare = next((b for b, k in BARE_KEYS.items() if k == key), key)
            out.append(f"{bare}={value}")
    return out
