"""Training data: rows from a built-in task, a local file or a Hugging Face Hub dataset, and the sampler that
feeds their prompts to training, shuffled per epoch, resumable and sharded by rank.

A row is a plain ``dict``: ``prompt`` (a string or a list of chat messages) plus whatever columns the
rewards read (``answer``, ``numbers``, ``target``...).
"""

from __future__ import annotations

import difflib
import os
import random
import re
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from grpo.tasks import REASONING_GYM_PREFIX, SPLITS, TASKS, is_task, make_task

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""Local file suffixes and the ``datasets`` builder that reads each."""
DEFAULT_TASK_ROWS = {"train": 10_000, "test": 1_000}
"""Rows generated for a built-in task when ``limit`` is not given."""
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


class DataError(ValueError):
    """A data source that cannot be loaded, or rows that lack what training needs; the message says why."""


def _sources_allowed() -> str:
    return (
        f"a built-in task ({', '.join(TASKS)}), {REASONING_GYM_PREFIX}<task>, a local "
        f"{'/'.join(FILE_BUILDERS)} file or directory, or a Hugging Face Hub dataset name ('owner/name[:config]')"
    )


# ----- loading --------------------------------------------------------------------------------------------
def load_rows(
    source: str,
    *,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    task_options: Mapping[str, Any] | None = None,
    field_map: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Load data rows from ``source``.

    Args:
        source: a built-in task name (:data:`grpo.tasks.TASKS`) or ``reasoning_gym:<task>``, generated
            with :func:`grpo.tasks.make_task`; a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file
            (one split: ``split`` is not used) or a directory of such files (``split`` picks the
            files, by ``datasets``' naming rules); else a Hugging Face Hub dataset ``owner/name``,
            optionally ``owner/name:config``.
        split: for tasks ``train`` or ``test`` (disjoint problem sets, see :func:`grpo.tasks.split_of`);
            for directories and Hub datasets the split name.
        limit: at most this many rows (the first ones); for tasks the number generated (default
            :data:`DEFAULT_TASK_ROWS`).
        seed: the generation seed of tasks; files and Hub datasets keep their order.
        task_options: options of the task (``{"digits": 3}``); only for tasks.
        field_map: column renames applied last, ``{"question": "prompt"}``.

    Raises:
        FileNotFoundError: ``source`` looks like a path that does not exist.
        DataError: anything else that prevents loading (unknown source, bad options, Hub unreachable).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DataError(f"limit={limit!r} is not allowed; use an integer >= 0 or None (all rows)")
    if is_task(source):
        if split not in SPLITS:
            raise DataError(f"split {split!r} is not allowed for task {source!r}; allowed: {', '.join(SPLITS)}")
        n = limit if limit is not None else DEFAULT_TASK_ROWS[split]
        try:
            rows = make_task(source, n, seed, split=split, **dict(task_options or {}))
        except ValueError as exc:
            raise DataError(str(exc)) from exc
    else:
        if task_options:
            raise DataError(
                f"task_options {dict(task_options)} apply to built-in tasks only; {source!r} is not one "
                f"(tasks: {', '.join(TASKS)}, {REASONING_GYM_PREFIX}<task>)"
            )
        path = Path(source).expanduser()
        if path.exists():
            rows = _load_local(path, split, limit)
        elif path.suffix.lower() in FILE_BUILDERS or source.startswith(("/", "./", "../", "~")):
            raise FileNotFoundError(f"data file {source!r} does not exist")
        else:
            rows = _load_hub(source, split, limit)
    return rename_columns(rows, field_map, source) if field_map else rows


def _to_rows(dataset: Any, limit: int | None) -> list[dict[str, Any]]:
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    return dataset.to_list()


def _load_local(path: Path, split: str, limit: int | None) -> list[dict[str, Any]]:
    import datasets

    if path.is_dir():
        try:
            return _to_rows(datasets.load_dataset(str(path), split=split), limit)
        except Exception as exc:
            raise DataError(f"could not load split {split!r} from directory {str(path)!r}: {exc}") from exc
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"data file {str(path)!r} has an unknown type; allowed suffixes: {', '.join(FILE_BUILDERS)}")
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:
        raise DataError(f"could not read {str(path)!r} as {builder}: {exc}") from exc
    return _to_rows(dataset, limit)


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARIABLES)


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Return why the Hub's host cannot be reached (one quick connection), or None if it can or a proxy is set.

    ``datasets`` retries for about half a minute before it gives up on a network with no route to
    the Hub; this check answers in seconds.
    """
    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"cannot connect to {host}:{port} ({exc})"
    return None


def _load_hub(source: str, split: str, limit: int | None) -> list[dict[str, Any]]:
    if not _HUB_NAME.match(source):
        raise DataError(f"data source {source!r} is not recognized; a source is {_sources_allowed()}")
    name, _, config = source.partition(":")
    close = difflib.get_close_matches(source, list(TASKS), n=1, cutoff=0.75) if "/" not in source else []
    if close:
        raise DataError(
            f"data source {source!r} is not a built-in task or a local file; did you mean {close[0]!r}? "
            f"A source is {_sources_allowed()}"
        )
    offline = _hub_offline()
    if not offline and (why := _hub_unreachable()):
        raise DataError(
            f"{source!r} is not a built-in task or a local file, so it was taken for a Hugging Face Hub dataset, "
            f"but the Hub is unreachable: {why}. Download it where there is network (or set HF_HUB_OFFLINE=1 "
            f"to use a cached copy); a source is {_sources_allowed()}"
        )
    import datasets

    try:
        dataset = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:
        where = "offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) and not in the local cache" if offline else ""
        raise DataError(
            f"could not load Hugging Face Hub dataset {name!r}"
            + (f" (config {config!r})" if config else "")
            + f", split {split!r}: {where or f'{type(exc).__name__}: {exc}'}; a source is {_sources_allowed()}"
        ) from exc
    return _to_rows(dataset, limit)


# ----- columns --------------------------------------------------------------------------------------------
def rename_columns(
    rows: list[dict[str, Any]], field_map: Mapping[str, str], source: str = "data"
) -> list[dict[str, Any]]:
    """Return the rows with columns renamed by ``field_map`` (``{"question": "prompt"}``); renames are simultaneous.

    Raises:
        DataError: a column to rename is absent, or a new name is already taken by a column that stays.
    """
    if not rows or not field_map:
        return rows
    present = list(rows[0])
    missing = [old for old in field_map if old not in present]
    if missing:
        raise DataError(
            f"field_map renames {', '.join(map(repr, missing))} but {source!r} has no such column; "
            f"its columns are: {', '.join(present)}"
        )
    taken = [new for old, new in field_map.items() if new in present and new not in field_map and new != old]
    if taken:
        raise DataError(
            f"field_map would rename onto {', '.join(map(repr, taken))}, which {source!r} already has; "
            f"map that column away too or drop it first (columns: {', '.join(present)})"
        )
    targets = list(field_map.values())
    doubled = sorted({t for t in targets if targets.count(t) > 1})
    if doubled:
        raise DataError(f"field_map maps several columns onto {', '.join(map(repr, doubled))}")
    return [{field_map.get(k, k): v for k, v in row.items()} for row in rows]


def check_columns(rows: Sequence[Mapping[str, Any]], required: Sequence[str], source: str) -> None:
    """Raise :class:`DataError` unless every row has every ``required`` column.

    The message lists the missing columns (with how many rows lack each when only some do), the
    columns present, and how to map one with ``field_map``.
    """
    if not rows:
        raise DataError(f"data source {source!r} has no rows")
    lacking = {c: sum(c not in row for row in rows) for c in required}
    missing = {c: k for c, k in lacking.items() if k}
    if not missing:
        return
    present = list(dict.fromkeys(k for row in rows[:100] for k in row))
    described = [c if k == len(rows) else f"{c} (in {k} of {len(rows)} rows)" for c, k in missing.items()]
    example = next(iter(missing))
    raise DataError(
        f"data source {source!r} lacks column(s): {', '.join(described)}; its columns are: "
        f"{', '.join(present) or '(none)'}. Rename one with field_map, e.g. {{{present[0] if present else 'x'}: {example}}}"
    )


# ----- sampling -------------------------------------------------------------------------------------------
class PromptSampler:
    """The stream of prompts for training: each epoch a fresh shuffle, cut into global batches.

    A global batch is ``prompts_per_step`` rows; rank ``r`` of ``world_size`` gets the ``r``-th
    contiguous share of it (``prompts_per_step / world_size`` rows), so the shares are disjoint, cover
    the batch, and a prompt's group of completions stays on one rank. Each epoch is a new permutation
    seeded by ``(seed, epoch)``; the last ``num_rows % prompts_per_step`` rows of each permutation are
    skipped (different ones every epoch), so no batch holds a row twice. The state is ``(epoch,
    position, seed)``: a sampler that loads another's :meth:`state_dict` continues with exactly the
    prompts the other would have given.

    Iterating yields this rank's rows (or indices, when built from a row count); :meth:`next_indices`
    returns the indices into the rows.
    """

    def __init__(
        self,
        rows: Sequence[Any] | int,
        prompts_per_step: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """Set up the stream at epoch 0, position 0.

        Args:
            rows: the rows, or their number (then iteration yields indices).
            prompts_per_step: rows per global batch, over all ranks; divisible by ``world_size``.
            seed: seed of the per-epoch shuffles.
            shuffle: False keeps the rows' order in every epoch.
            rank: this process's rank, in ``[0, world_size)``.
            world_size: number of training processes.

        Raises:
            DataError: a bad argument, or fewer rows than ``prompts_per_step``.
        """
        self.rows = None if isinstance(rows, int) else rows
        self.num_rows = rows if isinstance(rows, int) else len(rows)
        for name, value, low in (("prompts_per_step", prompts_per_step, 1), ("world_size", world_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise DataError(f"PromptSampler: {name}={value!r} is not allowed; use an integer >= {low}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise DataError(f"PromptSampler: rank={rank!r} is not allowed with world_size={world_size}; use 0..{world_size - 1}")
        if prompts_per_step % world_size:
            raise DataError(
                f"PromptSampler: prompts_per_step={prompts_per_step} is not divisible by world_size={world_size}; "
                "each rank must get whole prompts (a prompt's group stays on one rank)"
            )
        if self.num_rows < prompts_per_step:
            raise DataError(
                f"PromptSampler: {self.num_rows} rows are fewer than prompts_per_step={prompts_per_step}; "
                "load more rows or lower prompts_per_step"
            )
        self.prompts_per_step, self.seed, self.shuffle = prompts_per_step, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order: tuple[int, list[int]] | None = None  # (epoch, permutation), cached

    @property
    def steps_per_epoch(self) -> int:
        """Global batches in one epoch."""
        return self.num_rows // self.prompts_per_step

    def _permutation(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            order = list(range(self.num_rows))
            if self.shuffle:
                random.Random(f"prompt-sampler:{self.seed}:{self.epoch}").shuffle(order)
            self._order = (self.epoch, order)
        return self._order[1]

    def next_global_indices(self) -> list[int]:
        """Advance one step and return the whole global batch (all ranks' indices, rank 0's first)."""
        if self.position + self.prompts_per_step > self.num_rows:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self._permutation()[self.position : self.position + self.prompts_per_step]
        self.position += self.prompts_per_step
        return batch

    def next_indices(self) -> list[int]:
        """Advance one step and return this rank's share of the global batch (indices into the rows)."""
        share = self.prompts_per_step // self.world_size
        return self.next_global_indices()[self.rank * share : (self.rank + 1) * share]

    def __iter__(self) -> Iterator[list[Any]]:
        return self

    def __next__(self) -> list[Any]:
        """This rank's next rows (indices when built from a row count); the stream never ends."""
        indices = self.next_indices()
        return indices if self.rows is None else [self.rows[i] for i in indices]

    def state_dict(self) -> dict[str, Any]:
        """Return the position in the stream: ``epoch``, ``position`` (rows used this epoch) and ``seed``,
        plus ``num_rows``, ``prompts_per_step`` and ``shuffle``, checked on load."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_rows": self.num_rows,
            "prompts_per_step": self.prompts_per_step,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict`; the rank and world size may differ from the saving run's.

        Raises:
            DataError: a key is missing, or the rows or batch size differ from the saving run's (the
                prompts would not be the same).
        """
        missing = [k for k in ("epoch", "position", "seed") if k not in state]
        if missing:
            raise DataError(f"PromptSampler state lacks {', '.join(missing)}; it has: {', '.join(state)}")
        for key in ("num_rows", "prompts_per_step", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(
                    f"PromptSampler state was saved with {key}={state[key]!r} but this sampler has "
                    f"{key}={getattr(self, key)!r}; a resumed run must load the same rows with the same batch size"
                )
        if not 0 <= state["position"] <= self.num_rows or state["epoch"] < 0:
            raise DataError(f"PromptSampler state has epoch={state['epoch']}, position={state['position']}; out of range")
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), state["seed"]
        self._order = None
