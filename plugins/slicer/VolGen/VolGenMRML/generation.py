"""One generation from MRML nodes to an MRML node, with ``volgen generate`` running out of process.

:class:`NodeGeneration` is the heart of the module's Logic, kept free of Qt and of ``slicer.app`` so it
runs headless (``slicer-core``) in the project's tests:

1. the input (segmentation or labelmap) and the optional reference are written as NIfTI into a temporary
   folder (:func:`VolGenMRML.export_inputs`);
2. ``volgen generate ... --progress json`` runs as a child process (:class:`VolGenLib.GenerationJob`);
3. :meth:`NodeGeneration.poll` (from a Qt timer) or :meth:`NodeGeneration.wait` hands each progress event
   to ``on_progress`` on the caller's thread;
4. on success the result is read into the output scalar volume node, under the input's parent transform
   (with ``samples`` > 1, sample 0 goes there and every further sample k into a new node of the output's
   scene, named ``<output> s<k>``); the temporary folder is removed (unless "keep temporary files"); on
   cancel the process is terminated (then killed) and every file removed; on failure the CLI's error line
   becomes :attr:`Outcome.error`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from VolGenLib import (
    GenerationJob,
    GenerationParameters,
    ModelInfoError,
    ProgressEvent,
    RunResult,
    model_folder,
    model_label_map,
    panel_error,
)

from .volumes import ExportReport, InputError, export_inputs, import_result, is_segmentation


@dataclass
class Outcome:
    """How a generation ended.

    Attributes:
        ok: The output node holds the generated volume.
        error: What went wrong, for the user (``None`` on success or cancel).
        cancelled: The user cancelled.
        output_node: The node that received the result (sample 0).
        output_nodes: Every sample's node, in order (``[output_node]`` for one sample).
        seconds: Wall time of the whole generation.
        notes: Remarks for the user (segments left out, the default model's notice, kept files).
        run: The CLI run's details (events, stderr), when it started.
    """

    ok: bool
    error: str | None = None
    cancelled: bool = False
    output_node: object | None = None
    output_nodes: list = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    run: RunResult | None = None


class NodeGeneration:
    """Generate a synthetic volume for an MRML segmentation or labelmap node.

    Args:
        input_node: ``vtkMRMLSegmentationNode`` or ``vtkMRMLLabelMapVolumeNode``.
        output_node: ``vtkMRMLScalarVolumeNode`` that receives the result (its data is replaced).
        params: The settings (model folder, λ, steps, scheduler, seed, ρ, class selection, device).
        reference_node: Real image for λ (``vtkMRMLScalarVolumeNode``), or ``None``.
        python: Python executable with volgen (default: Slicer's own; this one outside Slicer).
        keep_files: Keep the temporary folder after a finished or failed run.
        workspace_root: Where to create the temporary folder (default: the system's temp folder).
        on_progress: Called with every :class:`VolGenLib.ProgressEvent`, on the thread that polls.
        output_name: Name given to the output node (default: ``<input> synthetic``).
    """

    def __init__(
        self,
        input_node,
        output_node,
        params: GenerationParameters,
        *,
        reference_node=None,
        python: str | None = None,
        keep_files: bool = False,
        workspace_root: str | Path | None = None,
        on_progress: Callable[[ProgressEvent], None] | None = None,
        output_name: str | None = None,
    ):
        if output_node is None:
            raise InputError("choose or create an output volume")
        params.validate()
        if params.needs_reference and reference_node is None:
            raise InputError("λ below 1 interpolates towards a real image: choose a reference volume")
        self.input_node = input_node
        self.output_node = output_node
        self.reference_node = reference_node
        self.params = params
        self.python = python
        self.on_progress = on_progress
        self.output_name = output_name
        self.job = GenerationJob(
            params,
            python=python,
            with_reference=reference_node is not None,
            keep_files=keep_files,
            workspace_root=workspace_root,
        )
        self.report: ExportReport | None = None
        self.outcome: Outcome | None = None
        self._started = time.monotonic()

    def classes(self) -> dict[str, list[int]]:
        """The model's label map (class name -> values), needed to map segments onto label values."""
        model = model_folder(self.params.model_dir, self.python)
        if model is None:
            raise InputError(
                f"cannot find the model {self.params.model_dir or 'default'!r}: not a folder, nor a model "
                "of the volgen installed in the chosen Python (volgen models lists them)"
            )
        try:
            return model_label_map(model)
        except ModelInfoError as e:
            raise InputError(str(e)) from None

    def start(self) -> NodeGeneration:
        """Export the inputs and start the CLI; export problems raise :class:`VolGenMRML.InputError`."""
        try:
            classes = self.classes() if is_segmentation(self.input_node) else {}
            self.report = export_inputs(
                self.input_node,
                self.job.paths.input,
                classes=classes,
                reference_node=self.reference_node,
                reference_path=self.job.paths.reference,
            )
            self.job.start()
        except Exception:
            self.job.cancel()
            raise
        return self

    @property
    def finished(self) -> bool:
        """The outcome is known (after :meth:`poll` returned ``True``, :meth:`wait` or :meth:`cancel`)."""
        return self.outcome is not None

    def poll(self) -> bool:
        """Hand new events to ``on_progress``; finish up when the CLI has ended. Never blocks for long.

        Returns:
            ``True`` once the generation is over (see :attr:`outcome`).
        """
        if self.outcome is not None:
            return True
        for event in self.job.poll():
            self._emit(event)
        if self.job.finished:
            self._finish(self.job.result())
            return True
        return False

    def wait(self, timeout: float | None = None) -> Outcome:
        """Block until the generation is over (Slicer's self-test, scripts)."""
        if self.outcome is None:
            result = self.job.wait(timeout=timeout, on_event=self._emit)
            if self.outcome is None:
                self._finish(result)
        assert self.outcome is not None
        return self.outcome

    def cancel(self) -> Outcome:
        """Terminate the CLI (kill after a timeout), remove every temporary file; the output is untouched."""
        if self.outcome is None:
            self.job.cancel()
            run = self.job.runner.result() if self.job.runner is not None else None
            self.outcome = Outcome(
                ok=False,
                cancelled=True,
                output_node=self.output_node,
                seconds=time.monotonic() - self._started,
                notes=self._notes(run),
                run=run,
            )
        return self.outcome

    def _emit(self, event: ProgressEvent) -> None:
        if self.on_progress is not None:
            self.on_progress(event)

    def _notes(self, run: RunResult | None) -> list[str]:
        notes = list(self.report.notes) if self.report is not None else []
        if run is not None:
            notes += [e.message for e in run.events if e.kind == "notice" and e.message]
        return list(dict.fromkeys(notes))

    def _finish(self, result: RunResult) -> None:
        elapsed = time.monotonic() - self._started
        if result.cancelled:
            self.job.workspace.cleanup(force=True)
            self.outcome = Outcome(
                ok=False, cancelled=True, output_node=self.output_node, seconds=elapsed, run=result
            )
            return
        notes = self._notes(result)
        error = None if result.error is None else panel_error(result.error, self.job.paths)
        nodes: list = []
        if error is None and result.output is not None:
            try:
                nodes = self._import_samples(result.outputs or [result.output])
            except OSError as e:
                error = f"cannot read the generated volume back: {e}"
        if self.job.workspace.keep:
            notes.append(f"temporary files kept in {self.job.workspace.folder}")
        self.job.close()
        self.outcome = Outcome(
            ok=error is None,
            error=error,
            output_node=self.output_node,
            output_nodes=nodes,
            seconds=time.monotonic() - self._started,
            notes=notes,
            run=result,
        )

    def _import_samples(self, outputs: list[Path]) -> list:
        """Read every sample into its node (sample 0 into the output node, sample k into a new node
        ``<output> s<k>``); a failure removes the nodes made here again."""
        name = self.output_name or f"{self.input_node.GetName()} synthetic"
        like = self.reference_node if self.reference_node is not None else self.input_node
        import_result(outputs[0], self.output_node, like=like, name=name)
        nodes = [self.output_node]
        scene = self.output_node.GetScene()
        try:
            for k, path in enumerate(outputs[1:], start=1):
                label = scene.GenerateUniqueName(f"{name} s{k}")
                nodes.append(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", label))
                import_result(path, nodes[-1], like=like, name=label)
        except BaseException:
            for node in nodes[1:]:
                scene.RemoveNode(node)
            raise
        return nodes
