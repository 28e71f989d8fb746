"""VolGen: generate a synthetic CT or MRI volume from a segmentation, inside 3D Slicer.

The four roles of a Slicer scripted module are kept apart:

- :class:`VolGen` (Module): title, category, help.
- :class:`VolGenWidget` (Widget): the panel; the only code here that touches Qt.
- :class:`VolGenLogic` (Logic): takes nodes and plain values, reports progress through a callback. The
  work itself is :class:`VolGenMRML.NodeGeneration` (export to NIfTI, ``volgen generate`` as a child
  process, result read back), which needs no Qt and is tested headless with ``slicer-core``.
- :class:`VolGenTest` (Test): runs the whole path inside Slicer.

volgen runs out of process, through its command line (``python -m volgen generate ... --progress json``),
so a crash or a memory spike of PyTorch cannot take Slicer down, and cancelling is terminating a process.

No ``from __future__ import annotations`` here: the parameter node wrapper reads the annotations of
:class:`VolGenParameterNode` at run time.
"""

import logging
import os
import random
import sys
import typing
from typing import Annotated

import ctk
import qt
import slicer
import vtk
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if _MODULE_DIR not in sys.path:  # the helper packages live next to this file
    sys.path.insert(0, _MODULE_DIR)

from VolGenLib import (  # noqa: E402
    DEVICES,
    FILE_FILTER,
    GUIDANCE_SCALE,
    MAX_GUIDANCE_SCALE,
    MAX_SAMPLES,
    MODEL_STEPS,
    SCHEDULERS,
    EnvironmentStatus,
    GenerationParameters,
    InstallSource,
    InstallSourceError,
    ModelInfoError,
    ParameterError,
    ProgressEvent,
    check_environment,
    default_model_dir,
    default_python_executable,
    forget_environment_checks,
    guidance_option,
    install_source,
    model_classes,
    model_folder,
    model_label_map,
    model_summary,
    pip_arguments,
    steps_option,
)
from VolGenMRML import InputError, NodeGeneration, Outcome, dimensions, ijk_to_ras, labelmap_node_from_array  # noqa: E402

#
# Module
#


class VolGen(ScriptedLoadableModule):
    """Module metadata (what Slicer shows in the module list and the Help section)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "VolGen"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["volgen developers"]
        self.parent.helpText = """
Generate a synthetic image volume (CT or MRI) whose anatomy follows a segmentation, voxel for voxel, on the
same grid, with a segmentation-guided diffusion model (volgen). Uncheck classes to let the model invent
that anatomy; with a reference image, λ slides between the real image (0) and a new one (1).
plugins/slicer/README.md in the volgen sources explains every control and how to install volgen.
"""
        self.parent.acknowledgementText = """
Method: Konz et al., "Anatomically-Controllable Medical Image Generation with Segmentation-Guided Diffusion
Models", MICCAI 2024. Images produced by this module are synthetic and not for diagnosis.
"""


#
# Parameter node
#


@parameterNodeWrapper
class VolGenParameterNode:
    """The panel's state, saved with the scene.

    inputNode: segmentation or labelmap volume to generate from.
    referenceVolume: optional real image on the segmentation's grid (enables λ).
    outputVolume: volume receiving the result (``None``: a new one is created).
    modelDirectory: volgen model folder, or an embedded model by name ("default", "colin27-native-1mm", ...);
        "" : volgen's embedded default model.
    droppedClasses: comma-separated classes unchecked in the panel.
    strength: λ in [0, 1] (used only with a reference).
    steps, scheduler, seed, noiseCorrelation (ρ), device: as ``volgen generate``; steps 0 (shown "model's"):
        the model decides (no ``--steps``: its own steps, else volgen's default).
    guidanceScale: classifier-free guidance ``w``; at its default the model decides (no ``--guidance-scale``).
    sliceAxes: comma-separated slice axes of a multi-axis model ("" : the model's own axis).
    samples: volumes to generate (``--samples``; seeds seed, seed + 1, ...), each into its own node.
    unknownLabelsAsBackground: ``--unknown-labels background`` instead of refusing unknown values.
    keepTemporaryFiles: keep the temporary folder after a run.
    pythonExecutable: Python with volgen ("" : Slicer's own PythonSlicer).
    """

    # typing.Union (not X | Y) with None: what the wrapper recognises as "one of these node types, or none"
    inputNode: typing.Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]  # noqa: UP007
    referenceVolume: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    modelDirectory: str = ""
    droppedClasses: str = ""
    # Defaults: those of GenerationParameters, which a test compares with volgen's own (the library may not
    # be installed in Slicer's Python yet, so it cannot be imported here).
    strength: Annotated[float, WithinRange(0.0, 1.0)] = GenerationParameters.strength
    steps: Annotated[int, WithinRange(MODEL_STEPS, 1000)] = MODEL_STEPS
    scheduler: Annotated[str, Choice(list(SCHEDULERS))] = GenerationParameters.scheduler
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = GenerationParameters.seed
    noiseCorrelation: Annotated[float, WithinRange(0.0, 0.999)] = GenerationParameters.noise_correlation
    device: Annotated[str, Choice(list(DEVICES))] = GenerationParameters.device
    guidanceScale: Annotated[float, WithinRange(0.0, MAX_GUIDANCE_SCALE)] = GUIDANCE_SCALE
    sliceAxes: str = ""
    samples: Annotated[int, WithinRange(1, MAX_SAMPLES)] = GenerationParameters.samples
    unknownLabelsAsBackground: bool = False
    keepTemporaryFiles: bool = False
    pythonExecutable: str = ""


#
# Widget
#


class VolGenWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Reads and writes the parameter node, starts and follows the Logic, shows the result."""

    POLL_MS = 150

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._classCheckBoxes = {}
        self._classesKey = None
        self._updatingGui = False
        self._timer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VolGen.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = VolGenLogic()

        self.ui.modelPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs | ctk.ctkPathLineEdit.Readable
        self.ui.modelPathLineEdit.settingKey = "VolGen/ModelDirectory"
        self.ui.pythonPathLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Executable
        self.ui.pythonPathLineEdit.toolTip += f"\nDefault: {default_python_executable()}"

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.generateButton.connect("clicked(bool)", self.onGenerate)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.newSeedButton.connect("clicked(bool)", self.onNewSeed)
        self.ui.selectAllClassesButton.connect("clicked(bool)", lambda: self.setAllClasses(True))
        self.ui.selectNoClassesButton.connect("clicked(bool)", lambda: self.setAllClasses(False))
        self.ui.checkEnvironmentButton.connect("clicked(bool)", self.onCheckEnvironment)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.pythonPathLineEdit.connect("currentPathChanged(QString)", self.onPythonPathChanged)

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.connect("timeout()", self.onPoll)

        self.initializeParameterNode()

    # -- lifecycle (as in Slicer's scripted module template) ------------------------------------------------

    def cleanup(self):
        """Called when the application closes and the module widget is destroyed."""
        if self._timer is not None:
            self._timer.stop()
        if self.logic is not None:
            self.logic.cancel()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified
            )

    def onSceneStartClose(self, caller, event):
        if self.logic is not None and self.logic.running:
            self.logic.cancel()
            self._setRunning(False)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputNode:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if first is None:
                first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLLabelMapVolumeNode")
            if first is not None:
                self._parameterNode.inputNode = first

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified
            )
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    # -- parameter node <-> the widgets connectGui does not handle -----------------------------------------

    def _onParameterNodeModified(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGui:
            return
        self._updatingGui = True
        try:
            node = self._parameterNode
            if self.ui.modelPathLineEdit.currentPath != node.modelDirectory:
                self.ui.modelPathLineEdit.currentPath = node.modelDirectory
            if self.ui.pythonPathLineEdit.currentPath != node.pythonExecutable:
                self.ui.pythonPathLineEdit.currentPath = node.pythonExecutable
            hasReference = node.referenceVolume is not None
            self.ui.strengthSlider.enabled = hasReference
            self.ui.strengthLabel.enabled = hasReference
            self._refreshClasses()
            self._updateButtons()
        finally:
            self._updatingGui = False

    def _updateButtons(self):
        running = self.logic is not None and self.logic.running
        node = self._parameterNode
        ready = node is not None and node.inputNode is not None and not running
        self.ui.generateButton.enabled = ready
        self.ui.generateButton.toolTip = (
            "Generate the synthetic volume." if ready else "Choose an input segmentation or labelmap volume."
        )
        self.ui.cancelButton.enabled = running

    def onModelPathChanged(self, path):
        if self._parameterNode is not None and not self._updatingGui:
            self._parameterNode.modelDirectory = path.strip()

    def onPythonPathChanged(self, path):
        if self._parameterNode is not None and not self._updatingGui:
            self._parameterNode.pythonExecutable = path.strip()

    def onNewSeed(self):
        if self._parameterNode is not None:
            self._parameterNode.seed = random.randrange(2**31 - 1)

    # -- class checkboxes ------------------------------------------------------------------------------------

    def _refreshClasses(self):
        """Rebuild the checkboxes when the model (or the Python that locates the default model) changed."""
        node = self._parameterNode
        key = (node.modelDirectory, node.pythonExecutable)
        if key != self._classesKey:
            self._classesKey = key
            try:
                with slicer.util.WaitCursor():
                    names, summary = self.logic.modelClassesAndSummary(
                        node.modelDirectory, node.pythonExecutable
                    )
            except (ModelInfoError, InputError) as e:
                names, summary = [], f"<span style='color:#c33'>{e}</span>"
            self._buildClassCheckBoxes(names)
            self.ui.modelInfoLabel.text = summary
        dropped = set(self._droppedFromNode())
        for name, checkBox in self._classCheckBoxes.items():
            checkBox.blockSignals(True)
            checkBox.checked = name not in dropped
            checkBox.blockSignals(False)

    def _buildClassCheckBoxes(self, names):
        for checkBox in self._classCheckBoxes.values():
            self.ui.classesWidget.layout().removeWidget(checkBox)
            checkBox.deleteLater()
        self._classCheckBoxes = {}
        for index, name in enumerate(names):
            checkBox = qt.QCheckBox(name)
            checkBox.toolTip = f"Keep '{name}' in the condition (unchecked: it becomes background)."
            checkBox.connect("toggled(bool)", lambda checked, n=name: self.onClassToggled(n, checked))
            self.ui.classesWidget.layout().addWidget(checkBox, index // 2, index % 2)
            self._classCheckBoxes[name] = checkBox
        self.ui.classesHintLabel.visible = bool(names)
        self.ui.selectAllClassesButton.enabled = self.ui.selectNoClassesButton.enabled = bool(names)

    def _droppedFromNode(self):
        return [n for n in self._parameterNode.droppedClasses.split(",") if n]

    def onClassToggled(self, name, checked):
        if self._parameterNode is None:
            return
        dropped = [n for n in self._droppedFromNode() if n != name]
        if not checked:
            dropped.append(name)
        self._parameterNode.droppedClasses = ",".join(sorted(set(dropped)))

    def setAllClasses(self, checked):
        if self._parameterNode is not None:
            self._parameterNode.droppedClasses = "" if checked else ",".join(self._classCheckBoxes)

    # -- environment ---------------------------------------------------------------------------------------

    def onCheckEnvironment(self):
        self._ensureEnvironment(verbose=True)

    def _ensureEnvironment(self, verbose=False):
        """True when the chosen Python has volgen and torch; offers to install volgen into Slicer's Python."""
        python = self.logic.pythonExecutable(self._parameterNode.pythonExecutable)
        with slicer.util.WaitCursor():
            status = self.logic.checkEnvironment(python)
        if status.ready:
            gpu = "CUDA available" if status.cuda else "CPU only"
            self.ui.environmentLabel.text = (
                f"volgen {status.volgen_version}, torch {status.torch_version} ({gpu})"
            )
            if verbose:
                slicer.util.infoDisplay(f"{python}\n\n{self.ui.environmentLabel.text}", windowTitle="VolGen")
            return True
        self.ui.environmentLabel.text = status.error or "volgen is not ready"
        if not self.logic.isSlicerPython(python):
            slicer.util.errorDisplay(
                f"The Python executable\n{python}\ncannot run volgen: {status.error}\n\n"
                "Install volgen and torch into that environment, or clear the Python executable field to use "
                "Slicer's own Python.",
                windowTitle="VolGen",
            )
            return False
        if status.torch_version is None:
            slicer.util.errorDisplay(
                "PyTorch is not installed in Slicer's Python.\n\nInstall the 'PyTorch' extension "
                "(View → Extensions Manager), restart Slicer, open the 'PyTorch Utils' module and install "
                "torch there (choose a CUDA build if you have an NVIDIA GPU). Then try again.\n\n"
                "VolGen never installs torch itself.",
                windowTitle="VolGen",
            )
            return False
        source = self._askInstallSource()
        if source is None:
            return False
        try:
            with slicer.util.WaitCursor():
                self.logic.installVolgen(source)
        except Exception as e:  # noqa: BLE001 - pip failures come in many kinds; show them
            slicer.util.errorDisplay(f"Installing volgen failed: {e}", windowTitle="VolGen")
            return False
        self._classesKey = None  # the default model is now findable
        self._refreshClasses()
        return self._ensureEnvironment(verbose=verbose)

    def _askInstallSource(self):
        """Ask where to install volgen from (wheel, source archive or folder, or a URL); ``None``: cancelled.

        Never a bare name from the package index: the choice is checked by VolGenLib.install_source.
        """
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setWindowTitle("VolGen")
        box.setIcon(qt.QMessageBox.Question)
        box.setText(
            "volgen is not installed in Slicer's Python.\n\n"
            "Install it from a volgen wheel or source archive (volgen-*.whl, volgen-*.tar.gz), a volgen "
            "source folder (a checkout of the volgen repository), or a URL you type. Its dependencies "
            "(diffusers, SimpleITK, ...) come from the Python Package Index; the installed torch is kept."
        )
        fileButton = box.addButton("Wheel or archive...", qt.QMessageBox.AcceptRole)
        folderButton = box.addButton("Source folder...", qt.QMessageBox.AcceptRole)
        urlButton = box.addButton("URL...", qt.QMessageBox.AcceptRole)
        box.addButton(qt.QMessageBox.Cancel)
        box.exec_()
        clicked = box.clickedButton()
        if clicked == fileButton:
            text = qt.QFileDialog.getOpenFileName(None, "volgen wheel or source archive", "", FILE_FILTER)
        elif clicked == folderButton:
            text = qt.QFileDialog.getExistingDirectory(None, "volgen source folder")
        elif clicked == urlButton:
            text = qt.QInputDialog.getText(None, "VolGen", "URL of a volgen wheel, archive or repository:")
        else:
            return None
        if not text:
            return None
        try:
            source = install_source(text)
        except InstallSourceError as e:
            slicer.util.errorDisplay(str(e), windowTitle="VolGen")
            return None
        if not slicer.util.confirmOkCancelDisplay(
            f"Install volgen from {source.describe()}?\n\nThis can take a few minutes.", windowTitle="VolGen"
        ):
            return None
        return source

    # -- running -------------------------------------------------------------------------------------------

    def onGenerate(self):
        node = self._parameterNode
        if node is None or node.inputNode is None:
            return
        if not self._ensureEnvironment():
            return
        try:
            params = self.logic.parametersFrom(node, classes=list(self._classCheckBoxes))
            self.ui.statusLabel.text = "Exporting the input..."
            self.ui.progressBar.value = 0
            slicer.app.processEvents()
            with slicer.util.WaitCursor():
                self.logic.start(
                    node.inputNode,
                    node.outputVolume,
                    params,
                    referenceNode=node.referenceVolume,
                    python=self.logic.pythonExecutable(node.pythonExecutable),
                    keepTemporaryFiles=node.keepTemporaryFiles,
                    onProgress=self.onProgress,
                )
        except (ParameterError, InputError, OSError, RuntimeError) as e:
            self.ui.statusLabel.text = ""
            slicer.util.errorDisplay(f"Cannot start: {e}", windowTitle="VolGen")
            return
        if node.outputVolume is None:
            node.outputVolume = self.logic.generation.output_node
        self._setRunning(True)
        self.ui.statusLabel.text = "Starting volgen..."
        self._timer.start()

    def onProgress(self, event: ProgressEvent):
        if event.kind == "notice" and event.message:
            logging.info("volgen: %s", event.message)
        fraction = event.fraction
        if fraction is not None:
            self.ui.progressBar.value = int(round(1000 * fraction))
        self.ui.statusLabel.text = event.describe()

    def onPoll(self):
        outcome = self.logic.poll()
        if outcome is not None:
            self._timer.stop()
            self._finished(outcome)

    def onCancel(self):
        self._timer.stop()
        outcome = self.logic.cancel()
        if outcome is not None:
            self._finished(outcome)

    def _setRunning(self, running):
        for widget in (
            self.ui.inputsCollapsibleButton,
            self.ui.classesCollapsibleButton,
            self.ui.generationCollapsibleButton,
            self.ui.outputsCollapsibleButton,
            self.ui.advancedCollapsibleButton,
        ):
            widget.enabled = not running
        self.ui.progressBar.textVisible = running
        self._updateButtons()

    def _finished(self, outcome: Outcome):
        self._setRunning(False)
        node = self._parameterNode
        if node is not None and node.outputVolume is not None and node.outputVolume.GetScene() is None:
            node.outputVolume = None  # the volume made for a failed or cancelled run was removed
        notes = "\n".join(outcome.notes)
        if outcome.cancelled:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Cancelled: nothing was written."
            return
        if not outcome.ok:
            self.ui.statusLabel.text = f"Failed: {outcome.error}"
            details = "\n".join(outcome.run.stderr[-60:]) if outcome.run is not None else ""
            extra = {"detailedText": details} if details else {}
            slicer.util.errorDisplay(f"Generation failed:\n{outcome.error}", windowTitle="VolGen", **extra)
            return
        self.ui.progressBar.value = 1000
        samples = len(outcome.output_nodes)
        done = f"Done in {outcome.seconds:.1f} s" + (f" ({samples} volumes)." if samples > 1 else ".")
        self.ui.statusLabel.text = done + (f"\n{notes}" if notes else "")
        slicer.util.setSliceViewerLayers(background=outcome.output_node, fit=True)


#
# Logic
#


class VolGenLogic(ScriptedLoadableModuleLogic):
    """Generation from nodes and plain values; no Qt. Progress goes to a callback.

    Use :meth:`start` then :meth:`poll` (from a timer) for a responsive GUI, or :meth:`process` to block.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.generation = None
        self._createdOutput = None

    def getParameterNode(self):
        return VolGenParameterNode(super().getParameterNode())

    # -- environment and model -----------------------------------------------------------------------------

    @staticmethod
    def pythonExecutable(configured: str = "") -> str:
        """The configured Python executable, or Slicer's own."""
        return (configured or "").strip() or default_python_executable()

    @staticmethod
    def isSlicerPython(python: str) -> bool:
        """Whether ``python`` is Slicer's own interpreter (where the module may install volgen)."""
        try:
            return os.path.samefile(python, default_python_executable())
        except OSError:
            return python == default_python_executable()

    @staticmethod
    def checkEnvironment(python: str) -> EnvironmentStatus:
        """Whether ``python`` can import volgen and torch (runs it once; a ready answer is cached)."""
        return check_environment(python)

    @staticmethod
    def installVolgen(source: InstallSource) -> None:
        """Install volgen into Slicer's Python from a checked wheel, archive, folder or URL (see
        :func:`VolGenLib.install_source`), after the user agreed. Never a bare name from the package index.

        Refused without torch: volgen depends on torch, which must come from the PyTorch extension, not
        from this install (pip would otherwise pull a multi-GB torch build of its choosing).
        """
        if not isinstance(source, InstallSource):
            raise TypeError("installVolgen takes a VolGenLib.InstallSource (see VolGenLib.install_source)")
        status = check_environment(default_python_executable())
        if status.torch_version is None:
            raise RuntimeError("install torch with the PyTorch extension first")
        slicer.util.pip_install(pip_arguments(source))
        forget_environment_checks()

    def modelDirectory(self, configured: str, python: str = "") -> str:
        """The model folder to use: the configured folder or embedded model name ('default',
        'colin27-small'), or the default model of volgen in ``python``."""
        folder = model_folder(configured, self.pythonExecutable(python))
        if folder is None:
            raise InputError(
                f"no model {configured!r} (not a folder, nor a model of the volgen in the chosen Python)"
                if configured
                else "volgen is not installed in the chosen Python (Advanced → Check / install volgen)"
            )
        return str(folder)

    def modelClassesAndSummary(self, configured: str, python: str = ""):
        """The model's class names and a one-line description, for the panel."""
        folder = self.modelDirectory(configured, python)
        return model_classes(folder), model_summary(folder)

    def parametersFrom(self, node: VolGenParameterNode, classes=None) -> GenerationParameters:
        """:class:`VolGenLib.GenerationParameters` from the parameter node (λ is 1 without a reference)."""
        dropped = [n for n in node.droppedClasses.split(",") if n and (classes is None or n in classes)]
        return GenerationParameters(
            model_dir=node.modelDirectory or None,
            strength=float(node.strength) if node.referenceVolume is not None else 1.0,
            steps=steps_option(int(node.steps)),
            scheduler=node.scheduler,
            seed=int(node.seed),
            noise_correlation=float(node.noiseCorrelation),
            drop=dropped or None,
            device=node.device,
            unknown_labels="background" if node.unknownLabelsAsBackground else "error",
            guidance_scale=guidance_option(float(node.guidanceScale)),
            slice_axes=node.sliceAxes or None,
            samples=int(node.samples),
        )

    # -- running -------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.generation is not None and not self.generation.finished

    def start(
        self,
        inputNode,
        outputNode,
        params: GenerationParameters,
        *,
        referenceNode=None,
        python=None,
        keepTemporaryFiles=False,
        onProgress=None,
    ) -> NodeGeneration:
        """Export the inputs and start ``volgen generate``; returns at once (follow with :meth:`poll`).

        Args:
            inputNode: Segmentation or labelmap volume node.
            outputNode: Scalar volume node for the result; ``None`` creates one (removed again on failure).
            params: The settings.
            referenceNode: Real image for λ, on the input's grid (a segmentation is exported on its grid).
            python: Python executable with volgen (default: Slicer's own).
            keepTemporaryFiles: Keep the temporary folder after the run.
            onProgress: Called with each :class:`VolGenLib.ProgressEvent` (on the thread calling poll).
        """
        if self.running:
            raise RuntimeError("a generation is already running")
        self._createdOutput = None
        if outputNode is None:
            name = slicer.mrmlScene.GenerateUniqueName(f"{inputNode.GetName()} synthetic")
            outputNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
            self._createdOutput = outputNode
        try:
            self.generation = NodeGeneration(
                inputNode,
                outputNode,
                params,
                reference_node=referenceNode,
                python=python,
                keep_files=keepTemporaryFiles,
                on_progress=onProgress,
                output_name=outputNode.GetName(),
            ).start()
        except Exception:
            self._removeCreatedOutput()
            self.generation = None
            raise
        return self.generation

    def poll(self):
        """Pass new progress to the callback; the :class:`VolGenMRML.Outcome` once finished, else ``None``."""
        if self.generation is None or not self.generation.poll():
            return None
        return self._done(self.generation.outcome)

    def cancel(self):
        """Stop a running generation: terminate volgen, remove its files, remove an output node it created."""
        if not self.running:
            return None
        return self._done(self.generation.cancel())

    def process(
        self,
        inputNode,
        outputNode,
        params: GenerationParameters,
        *,
        referenceNode=None,
        python=None,
        keepTemporaryFiles=False,
        onProgress=None,
        timeout=None,
    ) -> Outcome:
        """Generate and wait (scripts, the self-test); same arguments as :meth:`start`."""
        self.start(
            inputNode,
            outputNode,
            params,
            referenceNode=referenceNode,
            python=python,
            keepTemporaryFiles=keepTemporaryFiles,
            onProgress=onProgress,
        )
        return self._done(self.generation.wait(timeout=timeout))

    def _done(self, outcome: Outcome) -> Outcome:
        if outcome.ok:
            for node in outcome.output_nodes or [outcome.output_node]:
                if node.GetDisplayNode() is None:
                    node.CreateDefaultDisplayNodes()
                node.GetDisplayNode().AutoWindowLevelOn()
            self._createdOutput = None
        else:
            self._removeCreatedOutput()
            if outcome.cancelled or outcome.error:
                logging.info("VolGen: %s", "cancelled" if outcome.cancelled else outcome.error)
        return outcome

    def _removeCreatedOutput(self):
        if self._createdOutput is not None and self._createdOutput.GetScene() is not None:
            slicer.mrmlScene.RemoveNode(self._createdOutput)
        self._createdOutput = None


#
# Test
#


class VolGenTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: a labelmap and a segmentation with oblique geometry through the real volgen CLI.

    Uses volgen's embedded default model with 2 steps on a small volume, so it takes seconds on a CPU.
    Needs volgen (and torch) in Slicer's Python; skipped otherwise.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_VolGen_labelmap()
        self.setUp()
        self.test_VolGen_segmentation()
        self.setUp()
        self.test_VolGen_cancel()

    # helpers

    def _ready(self):
        status = check_environment(default_python_executable())
        if not status.ready:
            self.delayDisplay(f"volgen is not usable in Slicer's Python ({status.error}); skipping")
            self.skipTest("volgen not installed")
        try:
            return model_label_map(default_model_dir(default_python_executable()))
        except ModelInfoError as e:
            self.delayDisplay(f"volgen's default model is not usable ({e}); skipping")
            self.skipTest("no default model")

    def _labels(self, classes, size=(20, 18, 9)):
        """A labelmap node: one box per class (the class's first value), oblique and anisotropic."""
        import numpy as np

        nx, ny, nz = size
        labels = np.zeros((nz, ny, nx), dtype=np.int16)
        for index, values in enumerate(classes.values(), start=1):
            labels[:, index : ny - index, 2 * index : nx - 2 * index] = values[0]
        angle = 0.3
        rotation = np.array(
            [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
        )
        matrix = np.eye(4)
        matrix[:3, :3] = rotation @ np.diag([0.8, 0.7, 2.5])
        matrix[:3, 3] = [-40.0, 12.5, 30.0]
        node = labelmap_node_from_array(labels, matrix, name="VolGenTestLabels")
        slicer.mrmlScene.AddNode(node)
        node.CreateDefaultDisplayNodes()
        return node

    def _check_grid(self, output, like):
        import numpy as np

        self.assertEqual(dimensions(output), dimensions(like))
        self.assertTrue(np.allclose(ijk_to_ras(output), ijk_to_ras(like), atol=1e-4))

    # tests

    def test_VolGen_labelmap(self):
        self.delayDisplay("VolGen: labelmap → synthetic volume")
        classes = self._ready()
        labelmap = self._labels(classes)
        logic = VolGenLogic()
        events = []
        params = GenerationParameters(steps=2, scheduler="ddim", device="cpu")
        outcome = logic.process(labelmap, None, params, onProgress=events.append, timeout=600)
        self.assertTrue(outcome.ok, outcome.error)
        self.assertTrue(any(e.kind == "progress" for e in events))
        self.assertEqual(events[-1].kind, "done")
        self._check_grid(outcome.output_node, labelmap)
        self.delayDisplay("Test passed")

    def test_VolGen_segmentation(self):
        self.delayDisplay("VolGen: segmentation (segments named after classes) → synthetic volume")
        classes = self._ready()
        labelmap = self._labels(classes)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "VolGenTestSegmentation")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(labelmap)  # as Segment Editor does
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation)
        seg = segmentation.GetSegmentation()
        for index, name in enumerate(classes):
            if index < seg.GetNumberOfSegments():
                seg.GetSegment(seg.GetNthSegmentID(index)).SetName(name.replace("_", " ").title())
        output = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "VolGenTestOutput")
        params = GenerationParameters(steps=2, scheduler="ddim", device="cpu", drop=list(classes)[:1])
        outcome = VolGenLogic().process(segmentation, output, params, timeout=600)
        self.assertTrue(outcome.ok, outcome.error)
        self.assertIs(outcome.output_node, output)
        self._check_grid(output, labelmap)
        self.delayDisplay("Test passed")

    def test_VolGen_cancel(self):
        self.delayDisplay("VolGen: cancel leaves no node and no files")
        classes = self._ready()
        labelmap = self._labels(classes, size=(64, 64, 40))
        logic = VolGenLogic()
        seen = []
        generation = logic.start(
            labelmap,
            None,
            GenerationParameters(steps=1000, scheduler="ddpm", device="cpu"),
            onProgress=seen.append,
        )
        created = generation.output_node
        folder = generation.job.workspace.folder
        import time

        deadline = time.monotonic() + 300
        while not any(e.kind == "progress" for e in seen) and time.monotonic() < deadline:
            self.assertIsNone(logic.poll(), "the run ended before it could be cancelled")
            time.sleep(0.1)
        outcome = logic.cancel()
        self.assertTrue(outcome.cancelled)
        self.assertIsNone(created.GetScene())
        self.assertFalse(os.path.exists(folder))
        self.delayDisplay("Test passed")
