"""Training configs: the defaults every phase shares, and loading ``get_config()`` files with overrides.

A config file in ``configs/`` starts from :func:`base_config` and states only what differs (the phase, its model
and data). ``bifrost train --config configs/x.py --config.optim.lr=1e-4`` loads it through ml_collections
``config_flags``; configs are locked, so an override or an attribute read of a key that does not exist is an error
naming the key.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Defaults for every phase. Phase-specific settings live under ``model`` and ``data``."""
    c = ml_collections.ConfigDict()
    c.phase = ""                      # a name registered in bifrost_jax.train.phases.PHASES
    c.seed = 0                        # parameter init, data order and the step RNG all derive from it

    # Device mesh ("data", "fsdp", "tensor"); one size may be -1 (fill with the remaining devices).
    # Multislice: dcn_* factors (default 1) split an axis across slices over the data-centre network.
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1,
                                        "dcn_data": 1, "dcn_fsdp": 1, "dcn_tensor": 1})

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000              # optimizer steps in total (a resumed run continues up to this)
    c.train.batch_size = 8            # global batch (examples per optimizer step, over all hosts)
    c.train.grad_accum_steps = 1      # micro-batches per step (scan); batch_size must divide by it
    c.train.log_every = 10            # steps between metric fetches (stdout, TensorBoard, metrics.jsonl)
    c.train.tensorboard = True        # also write TensorBoard event files (tensorboardX)
    c.train.peak_tflops_per_device = 0.0  # > 0: peak for the logged mfu (else env BIFROST_PEAK_TFLOPS / device table)
    # dtype of the FROZEN parameters ("" = their module's param_dtype; "bfloat16" halves a frozen backbone while
    # the trained parameters keep fp32 master weights). Applied at init, port/init_from loading and resume.
    c.train.frozen_param_dtype = ""
    # consecutive steps with a non-finite loss or gradient norm (their updates are skipped) before the run stops
    c.train.max_bad_steps = 10

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"            # adamw | sgd
    c.optim.lr = 1e-4                 # peak learning rate
    c.optim.warmup_steps = 0          # linear warm-up from 0 to lr
    c.optim.decay_steps = -1          # cosine decay length after warm-up; -1: train.steps - warmup_steps
    c.optim.end_lr_ratio = 0.0        # final lr = lr * end_lr_ratio
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.clip_grad_norm = 1.0      # global-norm clipping; 0 disables it
    c.optim.ema_decay = 0.0           # > 0 keeps an EMA of the trainable parameters (checkpointed)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 1000         # steps between saves (the last step is always saved)
    c.checkpoint.keep = 3             # checkpoints kept (the newest ones); >= 1
    c.checkpoint.keep_all = False     # True: never delete a checkpoint (checkpoint.keep is then ignored)
    c.checkpoint.async_save = True
    # Params-only initialisation from another run/phase: a checkpoint directory (a manager root such as
    # WORKDIR/<phase>/checkpoints, or one step directory in it). Ignored when resuming.
    c.checkpoint.init_from = ""
    c.checkpoint.init_step = -1       # -1: the latest step of init_from
    # Parameter subtrees (dotted prefixes, e.g. "vision_head") allowed to be absent from init_from: they keep
    # their random init. Anything else that is expected but absent raises.
    c.checkpoint.init_allow_missing = ()
    c.checkpoint.init_allow_unused = ()  # subtrees of init_from that this model does not use (else: an error)
    c.checkpoint.init_use_ema = False  # take the EMA weights of init_from
    # A resumed run refuses a config that differs from the checkpoint's in keys that break exact resumption (seed,
    # batch size, data, model, the model sections); dotted prefixes listed here may differ (e.g. ("data.data_dir",)).
    c.checkpoint.resume_allow_changes = ()

    c.model = ml_collections.ConfigDict()   # phase-specific
    c.data = ml_collections.ConfigDict()    # phase-specific
    return c


def config_dict(cfg) -> dict:
    """A plain dict of a ConfigDict section (or of a mapping)."""
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def load_config_file(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load ``get_config()`` from a Python file and apply ``key=value`` overrides (without the ``--config.``
    prefix). For programmatic use and tests; the command line goes through :func:`parse_config_flags`."""
    argv = ["--config", path] + [f"--config.{o.removeprefix('--config.')}" for o in overrides]
    config, _ = parse_config_flags(argv)
    return config


def parse_config_flags(argv: Sequence[str], extra_string_flags: Sequence[str] = ()):
    """Parse ``--config FILE [--config.key=value ...]`` and further ``--name=value`` string flags.

    Returns ``(config, {flag_name: value})``. Unknown flags and unknown config keys raise ``ValueError`` naming
    them. A private ``FlagValues`` keeps this callable many times in one process (tests, the CLI)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["bifrost"] + [str(a) for a in argv]
    fv = flags.FlagValues()
    # sys_argv: the override flags (--config.a.b) are discovered from this list, not from sys.argv.
    config_flags.DEFINE_config_file("config", None, "ml_collections get_config() file", flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    for name in extra_string_flags:
        flags.DEFINE_string(name, None, name, flag_values=fv)
    try:
        fv(argv)
    except flags.UnrecognizedFlagError as e:
        raise ValueError(f"unknown command-line flag {e.flagname!r} (flags: --config, --config.KEY=VALUE"
                         + "".join(f", --{n}" for n in extra_string_flags) + ")") from None
    except (AttributeError, KeyError) as e:
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        # config_flags' message is an escaped repr ('\'lrr\'\nDid you mean ...'); make it one plain line.
        detail = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\\", "").replace("'", "")
        detail = " ".join(detail.split())
        raise ValueError(f"unknown config key in {overrides}: {detail}") from None
    except flags.Error as e:
        raise ValueError(f"command line: {e}") from None
    if fv["config"].value is None:
        raise ValueError("missing --config FILE (an ml_collections get_config() file, e.g. configs/toy.py)")
    config = fv["config"].value
    if not isinstance(config, ml_collections.ConfigDict):
        # config_flags defers a bad file (missing, no get_config, import error) to first use; fail now instead.
        error = object.__getattribute__(config, "_error")
        raise ValueError(f"cannot load config file {fv['config'].config_filename!r}: {error}")
    return config, {n: fv[n].value for n in extra_string_flags}



def flatten_dotted(node, prefix: str = "") -> dict:
    """``{"a.b": value}`` of a nested mapping (a config's JSON, a settings record): what differences are named by."""
    if isinstance(node, Mapping):
        out: dict = {}
        for k, v in node.items():
            out.update(flatten_dotted(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (the error names the value and the allowed range)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: must be an integer >= 1")
    return value
