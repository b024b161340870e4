"""A run's identity: its resolved config as flat keys, what the command line changed from the config
file (a readable part of the default run name), and the settings that make it one method rather than
another (how ``tsf figures`` and ``tsf table`` group runs). No Lightning, no wandb: plain dicts."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from pathlib import Path
from typing import Any


def flatten_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as one level of dotted keys (``model.init_args.sampler.init_args.num_particles``),
    the form a wandb sweep's parameters take, so that runs can be filtered and grouped by them."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, name + "."))
        else:
            flat[name] = [_plain(v) for v in value] if isinstance(value, (list, tuple)) else _plain(value)
    return flat


def _plain(value: Any) -> Any:
    """A config value as wandb stores it: numbers, strings, booleans and None as they are, paths as text."""
    return value if value is None or isinstance(value, (str, int, float, bool, dict)) else str(value)


#: settings that change how a run computes, never what it samples (left out of its identity): these
#: names anywhere, and the data module's batch size (a fine-tuning module's ``batch_size`` is its method's)
EXECUTION_KEYS = {"max_batch", "grad_batch", "decode_batch", "num_workers", "batch_invariant",
                  "gradient_checkpointing", "dtype"}
EXECUTION_PATHS = {"data.init_args.batch_size"}


def is_method_key(key: str) -> bool:
    """A ``model``/``data`` setting that changes what a run samples (not only how it computes)."""
    return (key.split(".")[0] in ("model", "data") and key not in EXECUTION_PATHS
            and key.rsplit(".", 1)[-1] not in EXECUTION_KEYS)


def canonical(value: Any) -> str:
    """A config value as one comparable string (keys sorted, paths and other objects as text)."""
    return json.dumps(value, sort_keys=True, default=str)


def digest(value: Any, length: int) -> str:
    """A short stable hash of a config value (a variant, an identity)."""
    return hashlib.sha1(canonical(value).encode()).hexdigest()[:length]


#: keys that a run name already shows (K and the seed)
NAMED_KEYS = {"model.init_args.sampler.init_args.num_particles", "data.init_args.seed"}


def config_variant(config: dict, file_config: dict) -> dict[str, Any]:
    """The settings of a run's resolved ``config`` that differ from its config file's (``file_config``:
    the same files parsed without command-line overrides), as dotted keys of the ``model`` and ``data``
    sections, without those a run name already shows or that only change how a run computes."""
    new, old = flatten_config(config), flatten_config(file_config)
    return {k: new[k] for k in sorted(new)  # a key only the file has was replaced by finer ones (a class's init_args)
            if is_method_key(k) and k not in NAMED_KEYS and new[k] != old.get(k)}


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each dotted key's shortest unique tail without ``init_args`` (``...sampler.init_args.alpha`` -> ``alpha``);
    a ``class_path`` is named by what it is the class of (``model.init_args.reward.class_path`` -> ``reward``)."""
    parts = {k: [p for p in k.split(".") if p != "init_args"] for k in keys}
    parts = {k: ps[:-1] if ps[-1] == "class_path" and len(ps) > 1 else ps for k, ps in parts.items()}
    short = {}
    for k, ps in parts.items():
        for n in range(1, len(ps) + 1):
            tail = ps[-n:]
            if all(q[-n:] != tail for j, q in parts.items() if j != k):
                short[k] = ".".join(tail)
                break
        else:
            short[k] = ".".join(ps)
    return short


#: names tsf itself gives the files and folders of a run directory: a path ending in one is named by its run
#: directory (``runs/finetune_draft/adapter`` -> ``finetune_draft``)
RUN_DIR_PARTS = {"adapter", "checkpoints", "last.ckpt", "shards", "samples.pt", "config.yaml", "metrics.json"}
#: the longest value a name token shows (a longer one is cut, and the name gets the variant's hash)
MAX_VALUE_LEN = 24


def short_path(text: str) -> str:
    """A path by its last part, without a file's suffix (``prompts/my_prompts.txt`` -> ``my_prompts``); a
    path inside a run directory by the run's name (``runs/finetune_draft/adapter`` -> ``finetune_draft``)."""
    parts = [p for p in Path(text).parts if p not in ("/", ".", "..")]
    while len(parts) > 1 and parts[-1] in RUN_DIR_PARTS:
        parts.pop()
    if not parts:
        return text
    last = Path(parts[-1])
    return last.stem if last.suffix and last.stem and not last.suffix[1:].isdigit() else last.name


def short_value(value: Any) -> str:
    """A value as a name token: numbers as they print, a path by its last part (:func:`short_path`), a class
    path by its class name, a list by its items joined with ``-``."""
    if isinstance(value, (list, tuple)):
        return "-".join(short_value(v) for v in value) or "none"
    text = "none" if value is None else str(value)
    if "/" in text and " " not in text.strip():
        text = short_path(text)
    elif re.fullmatch(r"[A-Za-z_][\w.]*\.[A-Z]\w*", text):
        text = text.rsplit(".", 1)[-1]
    return re.sub(r"[^\w.+-]+", "-", text).strip("-") or "x"


def _rank(key: str) -> tuple[int, str]:
    """The order of a variant's keys in a name: the sampler's, the base model's, the rest of the model's, the data's."""
    for n, part in enumerate(("model.init_args.sampler.", "model.init_args.base.", "model.")):
        if key.startswith(part):
            return n, key
    return 3, key


def variant_suffix(variant: dict[str, Any], max_len: int = 80) -> str:
    """A readable run-name suffix for ``variant`` (``alpha=1.0_num_steps=10``: the sampler's settings first,
    then the model's, then the data's). A value longer than :data:`MAX_VALUE_LEN` is cut; when something was
    cut or the whole would pass ``max_len`` characters, the tokens that fit come first and a hash of the
    whole variant last (so that two variants never share a name)."""
    if not variant:
        return ""
    keys = sorted(variant, key=_rank)
    short = short_keys(keys)
    values = {k: short_value(variant[k]) for k in keys}
    cut = any(len(v) > MAX_VALUE_LEN for v in values.values())
    tokens = [f"{short[k]}={v if len(v) <= MAX_VALUE_LEN else v[:MAX_VALUE_LEN].rstrip('-_.')}"
              for k, v in values.items()]
    text = "_".join(tokens)
    if len(text) <= max_len and not cut:
        return text
    tail = digest(variant, 8)
    kept = []
    for t in tokens:
        if len("_".join([*kept, t, tail])) > max_len:
            continue  # a shorter setting further on may still fit
        kept.append(t)
    return "_".join([*kept, tail])


def overrides_variant(args: list[str]) -> dict[str, Any]:
    """The settings that command-line overrides (``--section.key=value``, or ``--section.key value``) change, as
    :func:`config_variant` names them: ``model`` and ``data`` settings that change what a run samples."""
    import yaml

    found: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--") and "." in a.split("=", 1)[0]:
            if "=" in a:
                key, raw = a[2:].split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                key, raw = a[2:], args[i + 1]
                i += 1
            else:
                key, raw = a[2:], "true"
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw
            if is_method_key(key) and key not in NAMED_KEYS:
                found[key] = value
        i += 1
    return found


#: data settings that do not make another method (replicates of one method: other seeds, other sizes)
REPLICATE_KEYS = {"data.init_args.seed", "data.init_args.num_samples", "seed_everything"}


def budget_keys(flat: dict[str, Any]) -> set[str]:
    """The sampler settings that its ``for_budget`` sizes (``num_particles``, RBF's ``budget``, ...): they
    move a method along its compute axis, so they are not part of what the method is."""
    path = flat.get("model.init_args.sampler.class_path")
    names = {"num_particles", "budget"}
    if isinstance(path, str) and "." in path:
        module, _, name = path.rpartition(".")
        try:
            names |= set(getattr(importlib.import_module(module), name).for_budget(1000, 10))
        except Exception:  # a class that does not import here (a wandb run of another machine)
            pass
    return {f"model.init_args.sampler.init_args.{n}" for n in names}


def method_identity(config: dict) -> dict[str, Any]:
    """What makes a run one method rather than another: its resolved config (nested, or flat as wandb
    keeps it) without the settings that only change how it computes, how many samples or which seed it
    draws, and how large its sampler is (the budget axis of a scaling curve). Empty for no config."""
    flat = flatten_config(config)
    drop = REPLICATE_KEYS | budget_keys(flat)
    return {k: v for k, v in sorted(flat.items()) if is_method_key(k) and k not in drop}


def distinguishing_labels(labels: list[str], identities: list[dict[str, Any]], max_keys: int = 3) -> list[str]:
    """Each label, with the settings that tell apart runs sharing that label but not that identity
    appended (``das (adapter=draft)`` beside ``das (adapter=none)``: values as short as :func:`label_value`
    keeps them apart), so that two different methods never share a curve; an empty identity (unknown
    config) conflicts with none."""
    groups: dict[str, dict[str, dict]] = {}
    for label, ident in zip(labels, identities):
        if ident:
            groups.setdefault(label, {})[canonical(ident)] = ident
    out = []
    for label, ident in zip(labels, identities):
        distinct = list(groups.get(label, {}).values())
        if len(distinct) < 2 or not ident:
            out.append(label)
            continue
        keys = sorted((k for k in set().union(*distinct) if len({canonical(d.get(k)) for d in distinct}) > 1),
                      key=_rank)
        short = short_keys(keys)
        tokens = [f"{short[k]}={label_value(ident.get(k), [d.get(k) for d in distinct])}" for k in keys]
        if len(tokens) > max_keys:
            tokens = tokens[:max_keys - 1] + [digest(ident, 6)]
        out.append(f"{label} ({', '.join(tokens)})")
    return out


#: the last parts of a path that name no run (``runs/finetune_draft/adapter`` is named by ``finetune_draft``)
GENERIC_PARTS = {"adapter", "adapters", "checkpoint", "checkpoints", "lora", "model", "models", "weights", "last",
                 "final", "best", "unet", "transformer"}


WEIGHT_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".ckpt"}


def _path_name(text: str) -> str:
    """A path's name in a label: its last part that is not generic (:data:`GENERIC_PARTS`), without a file
    suffix and without the ``finetune_`` prefix of ``tsf finetune``'s run directories."""
    parts = [p for p in Path(text).parts if p not in ("/", ".", "..")]
    stems = [Path(p).stem if Path(p).suffix in WEIGHT_SUFFIXES else p for p in parts]
    name = next((s for s in reversed(stems) if s.lower() not in GENERIC_PARTS), stems[-1] if stems else text)
    return re.sub(r"^finetune_", "", name) or name


def label_value(value: Any, others: list[Any]) -> str:
    """``value`` as a legend or row label shows it, as short as keeps it apart from ``others`` (the values
    that other runs of the label have): a path by its run's name, cut after the first ``_``-separated
    words that no other path shares (``runs/overopt/finetune_draft_val_samples=50/adapter`` beside none
    gives ``draft``), anything else as :func:`short_value` writes it."""
    def is_path(v: Any) -> bool:
        return isinstance(v, str) and "/" in v and not re.fullmatch(r"[A-Za-z_][\w.]*\.[A-Z]\w*", v)

    if not is_path(value):
        return short_value(value)
    mine = _path_name(value)
    rivals = {_path_name(v) for v in others if is_path(v) and v != value}
    if mine in rivals:  # another path of the same run name (another folder): the path's last parts, or all of it
        same = [v for v in others if is_path(v) and v != value and short_value(v) == short_value(value)]
        return short_value(value) if not same else re.sub(r"[^\w.+=/-]+", "-", str(value))
    words = mine.split("_")
    for n in range(1, len(words) + 1):
        head = "_".join(words[:n])
        if not any(r == head or r.startswith(head + "_") for r in rivals):
            return short_value(head)
    return short_value(mine)
