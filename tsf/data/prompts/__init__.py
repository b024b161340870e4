"""Prompt sets: shipped text files, a user's own file, or a Hugging Face dataset.

Shipped sets (one prompt per line in this folder): ``animals`` (DDPO's 45 ``simple_animals``,
used by DDPO, DAS and SVDD for aesthetic and compressibility), ``animal_photos``
("a photo of a cat", ...) and ``animal_activities`` (DDPO's prompt-alignment set,
"a cat riding a bike", ...).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence, Union

from tsf.errors import ConfigError

HF_PREFIX = "hf:"
_TEXT_COLUMNS = ("prompt", "Prompt", "prompts", "text", "caption", "Caption")


def shipped_sets() -> list[str]:
    """The names of the prompt sets that ship with tsf."""
    return sorted(p.name[:-4] for p in resources.files(__name__).iterdir() if p.name.endswith(".txt"))


def parse_prompt_lines(text: str) -> list[str]:
    """One prompt per line; surrounding whitespace stripped, blank lines and ``#`` comment lines skipped."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def read_prompt_file(path: Union[str, os.PathLike]) -> list[str]:
    prompts = parse_prompt_lines(Path(path).read_text(encoding="utf-8"))
    if not prompts:
        raise ConfigError(f"prompt file {str(path)!r} has no prompts (one per line; # starts a comment)")
    return prompts


def load_dataset_prompts(name: str, split: str = "train", column: Optional[str] = None) -> list[str]:
    """The text column of a Hugging Face dataset (``datasets`` package; hub name or local directory)."""
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(f"prompts {HF_PREFIX}{name}: reading a Hugging Face dataset needs `pip install datasets`; "
                          "or export its prompts to a text file (one per line) and give its path") from e
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise ConfigError(f"prompts {HF_PREFIX}{name}: could not load split {split!r} ({type(e).__name__}: {e}); "
                          "without network, download the dataset first or give a text file of prompts") from e
    columns = list(ds.column_names)
    if column is None:
        column = next((c for c in _TEXT_COLUMNS if c in columns), None)
    if column not in columns:
        raise ConfigError(f"prompts {HF_PREFIX}{name}: no text column {column!r}; columns: {', '.join(columns)} "
                          f"(write {HF_PREFIX}{name}:{split}:<column>)")
    return [str(p).strip() for p in ds[column] if str(p).strip()]


def load_prompts(spec: Union[str, os.PathLike, Sequence[str]]) -> list[str]:
    """Prompts from a spec:

    - a shipped set's name: ``"animals"`` (see :func:`shipped_sets`);
    - a text file path: one prompt per line, blank lines and ``#`` comments skipped;
    - ``"hf:<dataset>[:<split>[:<column>]]"``: a Hugging Face dataset's text column
      (``datasets`` must be installed; default split ``train``, column ``prompt``/``text``/``caption``);
    - a list of prompts, returned as is.
    """
    if not isinstance(spec, (str, os.PathLike)):
        prompts = [str(p) for p in spec]
        if not prompts:
            raise ConfigError("an empty list of prompts")
        return prompts
    spec = os.fspath(spec)
    if spec.startswith(HF_PREFIX):
        name, split, column = (spec[len(HF_PREFIX):].split(":") + [None, None])[:3]
        return load_dataset_prompts(name, split or "train", column or None)
    if spec in shipped_sets():
        return parse_prompt_lines(resources.files(__name__).joinpath(f"{spec}.txt").read_text(encoding="utf-8"))
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        return read_prompt_file(path)
    raise ConfigError(f"prompts {spec!r}: not a shipped prompt set ({', '.join(shipped_sets())}), not an existing "
                      f"file, and not a dataset ({HF_PREFIX}<name>[:<split>[:<column>]])")


def conditions_or_prompts(conditions: Optional[Sequence], prompts: Union[None, str, Sequence[str]]) -> Optional[list]:
    """A config's conditions: its ``conditions`` or, instead, the prompt set ``prompts`` names
    (:func:`load_prompts`); both given is a :class:`~tsf.errors.ConfigError`."""
    if prompts is None:
        return None if conditions is None else list(conditions)
    if conditions:
        raise ConfigError("give conditions or prompts, not both: a list of prompts goes in prompts "
                          "(--data.init_args.prompts='[\"a red apple\", \"a photo of a cat\"]'), or pass "
                          "--data.init_args.prompts=null beside conditions")
    return load_prompts(prompts)
