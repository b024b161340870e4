"""Progress a person reads: Lightning's rich progress bar with a second line inside a long batch (the
denoising step, or the NFE spent against the NFE planned, with the time left), "Sampling" for a sampling
run, a fine-tuning run labelled by its steps, and a run's results table headed by its name.

The sampler stays plain PyTorch: :class:`BatchProgress` watches the base model's forward calls (one per
NFE, the step index as its second argument) and reports them to the progress bar through
:meth:`SamplingBar.on_sampling_progress`, a hook any progress bar callback may implement.
"""

from __future__ import annotations

import io
import time
from typing import Any, Optional

import torch

try:
    from lightning.pytorch.callbacks import RichProgressBar
    import rich  # noqa: F401
except ImportError:  # pragma: no cover - rich is installed with lightning's extras
    RichProgressBar = None  # type: ignore[assignment,misc]


class BatchProgress:
    """While a batch is sampled, counts the base model's forward calls (NFE, padding rows left out as the
    compute counter leaves them out) and the furthest denoising step, and reports them to ``report(done,
    total, unit)`` at most every ``every`` seconds: NFE against ``planned`` when a plan is known (the NFE
    per row of an earlier batch times this batch's rows), else steps against the model's ``num_steps``
    (``report(done, total, unit, note)``)."""

    def __init__(self, model: torch.nn.Module, report, planned: Optional[float] = None, every: float = 0.2) -> None:
        self.model, self.report, self.planned, self.every = model, report, planned, every
        self.steps = int(getattr(model, "num_steps", 0) or 0)
        self.nfe, self.step, self._last = 0, 0, 0.0

    def _hook(self, module, args, output) -> None:
        from tsf.samplers.base import _PADDING

        if not args or not torch.is_tensor(args[0]):
            return
        self.nfe += args[0].shape[0] - _PADDING.get()
        if len(args) > 1:
            i = args[1]
            try:
                i = int(i.max()) if torch.is_tensor(i) else int(i)
                self.step = max(self.step, i + 1)
            except (TypeError, ValueError):
                pass
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self.show()

    def show(self) -> None:
        if self.planned:
            self.report(self.nfe, max(self.nfe, int(round(self.planned))), "NFE")
        elif self.steps:
            self.report(min(self.step, self.steps), self.steps, "steps", f"NFE {self.nfe}")

    def __enter__(self) -> "BatchProgress":
        self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


if RichProgressBar is not None:
    class SamplingBar(RichProgressBar):
        """Lightning's rich progress bar, with:

        - a sampling run labelled "Sampling" (not "Testing");
        - inside a batch, a second line with its denoising steps, or its NFE spent against its NFE planned,
          and the time left (:meth:`on_sampling_progress`);
        - a run bounded by steps alone (``max_epochs`` unset: the fine-tuning baselines) labelled by its
          steps, not "Epoch 0/-2".
        """

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._inner: Optional[Any] = None
            self._inner_unit = ""

        @property
        def test_description(self) -> str:
            module = self._trainer.lightning_module if getattr(self, "_trainer", None) is not None else None
            return "Sampling" if hasattr(module, "sampler") else super().test_description

        def on_train_epoch_start(self, trainer, pl_module) -> None:  # a public hook: relabel the bar it made
            super().on_train_epoch_start(trainer, pl_module)
            if trainer.max_epochs not in (None, -1) or self.progress is None or self.train_progress_bar_id is None:
                return
            text = "Training steps"
            text = f"{text:{len(self.validation_description)}}" if len(self.validation_description) > len(text) else text
            self.progress.update(self.train_progress_bar_id, description=text)
            self.refresh()

        def on_sampling_progress(self, done: int, total: int, unit: str, note: str = "") -> None:
            """Show ``done`` of ``total`` ``unit`` inside the current batch (a line under the batches' bar, with
            the time left), and ``note`` beside the unit."""
            if self.is_disabled or self.progress is None:
                return
            if self._inner is None or self._inner_unit != unit:
                self._remove_inner()
                self._inner = self._add_task(total, f"  batch {unit}")
                self._inner_unit = unit
            description = f"  batch {unit}" + (f" ({note})" if note else "")
            if self.theme.description:
                description = f"[{self.theme.description}]{description}"
            self.progress.update(self._inner, completed=done, total=total, description=description)
            self.refresh()

        def _remove_inner(self) -> None:
            if self._inner is not None and self.progress is not None:
                self.progress.remove_task(self._inner)
            self._inner, self._inner_unit = None, ""

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0) -> None:
            self._remove_inner()
            super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                    dataloader_idx: int = 0) -> None:
            self._remove_inner()
            super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

        def on_exception(self, trainer, pl_module, exception) -> None:
            self._remove_inner()
            super().on_exception(trainer, pl_module, exception)
else:  # pragma: no cover
    SamplingBar = None  # type: ignore[assignment,misc]


def results_table(name: str, metrics: dict[str, float]) -> str:
    """A run's metrics as a two-column table headed by the run's name (instead of Lightning's "Test metric /
    DataLoader 0"): rich's box drawing where rich is installed (plain text when the output is not a
    terminal), else aligned text."""
    rows = [(k, f"{v:.6g}" if isinstance(v, (int, float)) else str(v)) for k, v in sorted(metrics.items())]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        width = max([len(name), *(len(k) for k, _ in rows)])
        return "\n".join([name, "-" * width, *(f"{k:<{width}}  {v}" for k, v in rows)])
    table = Table(title=None)
    table.add_column(name, justify="left", no_wrap=True)
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    out = io.StringIO()
    Console(width=max(80, len(name) + 24), file=out, color_system=None).print(table)
    return out.getvalue().rstrip("\n")
